"""Data: the seqio task registry, the paper's tasks, span corruption, vocabularies, T5's metrics and
the embedded synthetic suite. Knows no model."""
