"""Offline, seeded multitask data: EMT energies, forces and stresses of fcc alloys.

Only ASE and NumPy are needed (no nequip import), so ``import nequip_mtl.data`` is cheap.
"""

from .emt_alloy import (
    DEFAULT_ELEMENTS,
    DEFAULT_RATTLE_AMPLITUDES,
    LATTICE_CONSTANTS,
    SUPPORTED_ELEMENTS,
    generate_frames,
    make_dataset,
    write_frames,
)

__all__ = [
    "DEFAULT_ELEMENTS",
    "DEFAULT_RATTLE_AMPLITUDES",
    "LATTICE_CONSTANTS",
    "SUPPORTED_ELEMENTS",
    "generate_frames",
    "make_dataset",
    "write_frames",
]
