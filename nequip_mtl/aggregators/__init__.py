"""Gradient aggregators: pure-torch maps from a ``(num_tasks, num_params)`` gradient
matrix to one update vector. No Lightning or nequip imports, so each method can be
tested on its own in microseconds.
"""

from .base import Aggregator, GramAggregator
from .config import ConFIG

__all__ = ["Aggregator", "GramAggregator", "ConFIG"]
