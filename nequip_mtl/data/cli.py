"""Moved to :mod:`nequip_mtl.tools.make_data` (this path still works, with a DeprecationWarning;
``python -m nequip_mtl.data.cli`` too)."""

from .._moved import forward_module

__getattr__ = forward_module("nequip_mtl.data.cli", "nequip_mtl.tools.make_data")

if __name__ == "__main__":
    import sys

    from nequip_mtl.tools.make_data import main

    sys.exit(main())
