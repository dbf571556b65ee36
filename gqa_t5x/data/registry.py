"""The seqio registry as our runs see it: the paper's tasks and the synthetic suite registered on
first use, and an unknown name answered with the names that exist."""

from __future__ import annotations

import seqio


def _register_tasks() -> None:
    """Importing the task modules registers the paper's tasks and the synthetic suite."""
    from gqa_t5x.data import synthetic, tasks  # noqa: F401, PLC0415


def get_mixture_or_task(name: str):
    """The registered seqio task or mixture `name`, with an error that lists what exists."""
    _register_tasks()
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        raise ValueError(f"unknown task or mixture {name!r} (MIXTURE_OR_TASK_NAME); registered: "
                         f"{', '.join(names)}") from None
