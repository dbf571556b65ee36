"""Runs: the t5x-style EncoderDecoderModel (loss, predict, score), optimizer and schedules,
partitioning, train state and checkpointing, train and evaluate loops, the run log.

Importing the package imports none of its modules: t5x's gin files import `gqa_t5x.models`
alone, and registering `gqa_t5x.train.train` there too would make t5x's own `train` selector
ambiguous."""
