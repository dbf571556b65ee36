"""Experiments on top of the library: the decode benchmark, the synthetic sanity runs, the demo and
the reproduction driver."""
