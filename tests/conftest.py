"""Shared test setup. This folder is on sys.path (pytest puts a rootdir conftest's folder there), so
tests in the package folders import the helpers here: `numpy_t5` (a numpy T5.1.1) and
`toy_tasks` (tiny seqio tasks)."""
