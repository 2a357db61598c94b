"""Seeded, offline data generators and their command lines, apart from the training code.

- :mod:`~nequip_mtl.tools.emt_alloy`: EMT energies, forces and stresses of strained, rattled
  fcc alloys (bulk, vacancies, slabs); command line ``nequip-mtl-make-data``
  (:mod:`~nequip_mtl.tools.make_data`).
- :mod:`~nequip_mtl.tools.xtb_md`: GFN2-xTB molecular dynamics of a molecule with ``tblite``
  (the ``xtb`` extra), and xTB labels of given frames; command line
  ``nequip-mtl-make-xtb-data`` (:mod:`~nequip_mtl.tools.make_xtb_data`).
- :mod:`~nequip_mtl.tools.si_pair`: a periodic multi-fidelity pair of silicon cells, GFN2-xTB on
  bulk only, GFN1-xTB on bulk and defects, a GFN2-xTB test set of defects; command line
  ``nequip-mtl-make-si-pair`` (:mod:`~nequip_mtl.tools.make_si_pair`).

They write extended XYZ that nequip's ``ASEDataset`` reads. Only ASE and NumPy are imported
(no torch, no nequip; tblite only when an xTB calculation is made).

.. code-block:: python

    from nequip_mtl.tools import make_dataset

    make_dataset("data/alloy.xyz", num_frames=150, seed=0)
"""

from .emt_alloy import (
    DEFAULT_ELEMENTS,
    DEFAULT_RATTLE_AMPLITUDES,
    FRAME_KINDS,
    LATTICE_CONSTANTS,
    SUPPORTED_ELEMENTS,
    generate_frames,
    make_dataset,
    write_frames,
)
from .xtb_md import compare_labels, generate_xtb_md_frames, relabel_frames

__all__ = [
    "DEFAULT_ELEMENTS",
    "DEFAULT_RATTLE_AMPLITUDES",
    "FRAME_KINDS",
    "LATTICE_CONSTANTS",
    "SUPPORTED_ELEMENTS",
    "compare_labels",
    "generate_frames",
    "generate_xtb_md_frames",
    "make_dataset",
    "relabel_frames",
    "write_frames",
]
