"""The default process group, as the rest of the package asks about it (pure torch).

One place for "is this a run on several ranks?": the per-dataset metrics (whether a
dataset is empty on every rank), the task-gradient reduction, the conflict monitor's
rows and the sampler's ranks all read it here.
"""

from __future__ import annotations

import torch

__all__ = ["rank", "several_ranks", "world_size"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return torch.distributed.get_rank() if _initialized() else 0


def several_ranks() -> bool:
    """Whether a process group of more than one rank is running."""
    return world_size() > 1
