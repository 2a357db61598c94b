"""``nequip-mtl-make-si-pair``: the periodic silicon multi-fidelity pair of
:mod:`nequip_mtl.tools.si_pair` (GFN2-xTB on bulk, GFN1-xTB on bulk and defects, a GFN2-xTB
test set of defects) as three extended-XYZ files in a directory.

Example::

    nequip-mtl-make-si-pair benchmarks/data --seed 0
    nequip-mtl-make-si-pair /tmp/si --quick   # 8-atom cells, a frame or two per kind

tblite is imported only when a calculation is made (``pip install "nequip-mtl[xtb]"``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

from .._argtypes import non_negative_int, positive_int
from .si_pair import CHEAP_METHOD, EXPENSIVE_METHOD, FILE_NAMES, NEW_KINDS, QUICK, make_si_pair
from .xtb_md import _INSTALL_HINT, compare_labels

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """``nequip-mtl-make-si-pair``: write the three files and print what they hold.

    Example::

        nequip-mtl-make-si-pair benchmarks/data --seed 0

    Returns the exit status (0); bad arguments or a missing tblite exit with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import tblite.ase  # noqa: F401
    except ImportError:
        parser.error(_INSTALL_HINT)
    options = dict(
        seed=args.seed,
        num_bulk=args.bulk,
        cheap_per_kind=args.cheap_per_kind,
        num_test=args.test,
        repeat=args.repeat,
        relax_steps=args.relax_steps,
    )
    if args.quick:
        options.update(QUICK)
    if options["num_test"] < len(NEW_KINDS):
        parser.error(f"--test: must be >= {len(NEW_KINDS)} (one frame per new kind)")
    start = time.perf_counter()
    pair = make_si_pair(args.directory, **options)
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(summary(pair, args.directory, seconds))
    return 0


def summary(pair, directory: str, seconds: float) -> str:
    """What :func:`main` prints: each file's frames by kind and size, each level's cost, and
    how far the two levels are apart on the shared bulk geometries."""
    lines = [f"wrote the silicon pair to {directory} in {seconds:.0f} s:"]
    for name, frames in pair.frames.items():
        path = os.path.join(directory, f"{name}.xyz")
        kinds = Counter(a.info["config_type"] for a in frames)
        draws = sum(pair.draws[name].values())
        lines.append(
            f"  {name}.xyz: {len(frames)} {FILE_NAMES[name]} frames "
            f"({', '.join(f'{k} {n}' for k, n in kinds.items())}; {draws} draws), "
            f"{os.path.getsize(path) / 1e6:.2f} MB"
        )
    for method, st in pair.stats.items():
        lines.append(
            f"  {method}: {st.labelled} frames labelled, {st.scf_failed} draws refused for an "
            f"SCF that did not converge, {st.guesses_disagree} for guesses that converged apart; "
            f"{st.seconds_per_converged_call:.2f} s per converged single point, "
            f"{st.seconds:.0f} s in all"
        )
    lines.append(f"  templates: {pair.template_seconds:.0f} s")
    high = pair.frames["si_gfn2_bulk"]
    low = pair.frames["si_gfn1_all"][: len(high)]
    stats = compare_labels(high, low)
    lines.append(
        f"  {CHEAP_METHOD} - {EXPENSIVE_METHOD} on the {len(high)} shared bulk frames (eV, eV/A): "
        + ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if k != "num_frames")
    )
    return "\n".join(lines)


def _repeat(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three integers such as 2,1,1, got {text!r}"
        ) from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected three integers >= 1 such as 2,1,1, got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-mtl-make-si-pair",
        description=(
            "Write a periodic multi-fidelity pair of diamond-silicon cells labelled with "
            "tblite at the Gamma point (eV, eV/A, eV/A^3): si_gfn2_bulk.xyz (GFN2-xTB, bulk "
            "only), si_gfn1_all.xyz (GFN1-xTB, the same bulk plus large strains, shear, "
            "vacancies, divacancies, interstitials and hot rattles) and "
            "si_gfn2_defects_test.xyz (GFN2-xTB, fresh frames of the new kinds only)."
        ),
    )
    parser.add_argument("directory", help="output directory (created if needed)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="default: 0")
    parser.add_argument(
        "--bulk", type=positive_int, default=100, help="bulk frames, both levels (default: 100)"
    )
    parser.add_argument(
        "--cheap-per-kind",
        type=positive_int,
        default=70,
        help="GFN1-xTB frames of each new kind (default: 70)",
    )
    parser.add_argument(
        "--test", type=positive_int, default=100, help="GFN2-xTB test frames (default: 100)"
    )
    parser.add_argument(
        "--repeat",
        type=_repeat,
        default=(2, 1, 1),
        help="conventional diamond cubes per cell (default: 2,1,1, 16 atoms)",
    )
    parser.add_argument(
        "--relax-steps",
        type=non_negative_int,
        default=20,
        help="GFN1-xTB BFGS steps relaxing each defect template (default: 20)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run for tests: 8-atom cells, unrelaxed defects, a frame or two per kind",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print a summary")
    return parser


if __name__ == "__main__":
    sys.exit(main())
