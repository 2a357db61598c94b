"""Gradient aggregators: pure-torch maps from a ``(num_tasks, num_params)`` gradient
matrix to one update vector. No Lightning or nequip imports, so each method can be
tested on its own in microseconds.
"""

from .aligned_mtl import AlignedMTL
from .base import Aggregator, GramAggregator
from .cagrad import CAGrad
from .conflict_free import ConFIG
from .dualproj import DualProj
from .imtlg import IMTLG
from .mean import Mean
from .mgda import MGDA
from .momentum_config import MomentumConFIG
from .pcgrad import PCGrad
from .primary_constrained import PrimaryConstrained
from .sum import Sum
from .upgrad import UPGrad

__all__ = [
    "Aggregator",
    "GramAggregator",
    "ConFIG",
    "MomentumConFIG",
    "Mean",
    "Sum",
    "PCGrad",
    "IMTLG",
    "MGDA",
    "UPGrad",
    "DualProj",
    "AlignedMTL",
    "CAGrad",
    "PrimaryConstrained",
]
