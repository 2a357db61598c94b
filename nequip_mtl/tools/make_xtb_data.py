"""``nequip-mtl-make-xtb-data``: seeded GFN2-xTB molecular dynamics frames of a molecule (or, with
``--relabel``, xTB labels of an existing file) as extended XYZ; the generator is
:mod:`nequip_mtl.tools.xtb_md`.

Example::

    nequip-mtl-make-xtb-data benchmarks/data/ethanol_xtb_1200.xyz --frames 1200 \\
        --temperatures 300,600,900 --seed 0
    nequip-mtl-make-xtb-data dft_geometries_xtb.xyz \\
        --relabel benchmarks/data/ethanol_reduced_100.xyz

tblite is imported only when a calculation is made (``pip install "nequip-mtl[xtb]"``).
"""

from __future__ import annotations

import argparse
import sys
import time

from .._argtypes import positive_int
from .emt_alloy import write_frames
from .xtb_md import (
    _INSTALL_HINT,
    DEFAULT_MOLECULE,
    DEFAULT_TEMPERATURES,
    ENERGY_UNITS,
    XTB_METHODS,
    compare_labels,
    generate_xtb_md_frames,
    relabel_frames,
)

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """``nequip-mtl-make-xtb-data``: xTB MD frames (or, with ``--relabel``, xTB labels of a file).

    Example::

        nequip-mtl-make-xtb-data ethanol_xtb.xyz --frames 1200 --temperatures 300,600,900 --seed 0
        nequip-mtl-make-xtb-data dft_at_xtb.xyz --relabel ethanol_reduced_100.xyz

    Returns the exit status (0); bad arguments or a missing tblite exit with status 2.
    """
    import ase.io

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import tblite.ase  # noqa: F401
    except ImportError:
        parser.error(_INSTALL_HINT)

    start_time = time.perf_counter()
    if args.relabel:
        source = ase.io.read(args.relabel, index=":")
        frames = relabel_frames(source, method=args.method, energy_unit=args.units)
        write_frames(frames, args.output)
        seconds = time.perf_counter() - start_time
        if not args.quiet:
            print(
                f"relabelled {len(frames)} frames of {args.relabel} with {args.method} "
                f"({args.units}) to {args.output} in {seconds:.1f} s "
                f"({1000 * seconds / len(frames):.1f} ms per frame)"
            )
            if all(a.calc is not None and "energy" in a.calc.results for a in source):
                stats = compare_labels(source, frames)
                print(
                    f"{args.method} - {args.relabel} (assumed in {args.units}): "
                    + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
                )
        return 0

    if args.start:
        start = ase.io.read(args.start, index=0)
    else:
        from ase.build import molecule

        start = molecule(args.molecule)
    frames = generate_xtb_md_frames(
        num_frames=args.frames,
        temperatures=args.temperatures,
        seed=args.seed,
        start=start,
        stride=args.stride,
        equilibration_steps=args.equilibration,
        timestep_fs=args.timestep,
        friction_per_fs=args.friction,
        method=args.method,
        energy_unit=args.units,
    )
    write_frames(frames, args.output)
    seconds = time.perf_counter() - start_time
    if not args.quiet:
        steps = len(args.temperatures) * args.equilibration + len(frames) * args.stride
        print(
            f"wrote {len(frames)} {args.method} frames of {start.get_chemical_formula()} "
            f"({', '.join(f'{t:g} K' for t in args.temperatures)}; {args.units}) to "
            f"{args.output} in {seconds:.1f} s ({steps} MD steps, "
            f"{1000 * seconds / steps:.2f} ms per step)"
        )
    return 0


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated kelvins, got {text!r}"
        ) from None
    if not values or any(t <= 0 for t in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct temperatures > 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-mtl-make-xtb-data",
        description=(
            "Sample a molecule (default ethanol) by seeded Langevin MD on the GFN2-xTB "
            "surface (tblite), one trajectory per temperature, and write the kept frames "
            "with xTB energies and forces (kcal/mol, kcal/mol/A by default: the DFT ethanol "
            "file's units) as extended XYZ for nequip's ASEDataset. With --relabel, label "
            "the frames of an existing file instead."
        ),
    )
    parser.add_argument("output", help="output extended-XYZ file")
    parser.add_argument("--frames", type=positive_int, default=1200, help="default: 1200")
    parser.add_argument(
        "--temperatures",
        type=_temperatures,
        default=list(DEFAULT_TEMPERATURES),
        help="comma-separated kelvins, one trajectory each (default: 300,600,900)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--stride", type=positive_int, default=20, help="keep every k-th MD step (default: 20)"
    )
    parser.add_argument(
        "--equilibration",
        type=int,
        default=1000,
        help="MD steps before the first kept frame, per temperature (default: 1000)",
    )
    parser.add_argument("--timestep", type=float, default=0.5, help="fs (default: 0.5)")
    parser.add_argument(
        "--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default: 0.01)"
    )
    parser.add_argument("--method", choices=XTB_METHODS, default="GFN2-xTB")
    parser.add_argument("--units", choices=tuple(ENERGY_UNITS), default="kcal/mol")
    parser.add_argument(
        "--molecule",
        default=DEFAULT_MOLECULE,
        help=f"ase.build.molecule name of the start (default: {DEFAULT_MOLECULE})",
    )
    parser.add_argument("--start", help="start from the first frame of this file instead")
    parser.add_argument("--relabel", help="label this file's frames with xTB (no MD)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print a summary")
    return parser


if __name__ == "__main__":
    sys.exit(main())
