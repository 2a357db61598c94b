"""Moved to :mod:`nequip_mtl.tools.xtb_md`, its command line (``main``, ``build_parser``) to
:mod:`nequip_mtl.tools.make_xtb_data` (this path still works, with a DeprecationWarning;
``python -m nequip_mtl.data.xtb_md`` too)."""

from .._moved import forward_module, forward_names

_OLD = "nequip_mtl.data.xtb_md"
_CLI = ("main", "build_parser")
_cli = forward_names(_OLD, {name: f"nequip_mtl.tools.make_xtb_data:{name}" for name in _CLI})
_generator = forward_module(_OLD, "nequip_mtl.tools.xtb_md")


def __getattr__(name: str):
    return (_cli if name in _CLI else _generator)(name)


if __name__ == "__main__":
    import sys

    from nequip_mtl.tools.make_xtb_data import main

    sys.exit(main())
