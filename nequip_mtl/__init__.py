"""nequip-mtl: multitask training for NequIP interatomic potentials.

This package is loaded by ``import nequip`` through the ``nequip.extension``
entry point (name ``init_always``). It must therefore not import ``nequip``
at module level: subpackages (``nequip_mtl.train``, ...) import it lazily
when they are first used.
"""

__version__ = "0.1.0"
