"""Runs: the t5x-style EncoderDecoderModel (loss, predict, score), optimizer and schedules,
partitioning, train state and checkpointing, train and evaluate loops, the run log.

Importing this package registers every gin configurable of a run (`gqa_t5x.models.*`,
`gqa_t5x.optim.*`, `gqa_t5x.train.*`, `gqa_t5x.evaluate.*`)."""

from gqa_t5x.training import evaluate, models, optim, train  # noqa: F401
