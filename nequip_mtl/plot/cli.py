"""``nequip-mtl-plot RUN_DIR [--out DIR] [--units UNITS]``: figures of a training run's logs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .figures import FIGURES, make_plots
from .logs import NoLogsError
from .names import parse_units

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-mtl-plot",
        description=(
            "Plot a nequip / nequip-mtl training run from its logs (Lightning CSVLogger "
            "metrics.csv; TensorBoard event files if present): "
            + ", ".join(FIGURES)
            + ". Figures whose series were not logged are skipped with a note."
        ),
        epilog=(
            "Reading TensorBoard logs (events.out.tfevents.*) needs the `tensorboard` "
            'extra: pip install -e ".[tensorboard]" in the nequip-mtl checkout (or pip '
            "install tensorboard); CSV logs need nothing extra. Without it, event files are "
            "skipped with a note (an error if the run has no metrics.csv)."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the run's output directory (searched recursively for metrics.csv / events.out.tfevents.*)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where to write the PNG files (default: RUN_DIR/plots)",
    )
    parser.add_argument("--dpi", type=int, default=90, help="PNG resolution (default: 90)")
    parser.add_argument(
        "--units",
        metavar="UNITS",
        default=None,
        help=(
            "the energy and length units of the run's data, for the axis labels: "
            "`energy=kcal/mol,length=Å`, or an energy unit alone (`kcal/mol`, `meV`; length "
            "Å). Default: the `units` key of the run's config (.hydra/config.yaml in the run "
            "directory, e.g. `units: {energy: kcal/mol, length: Å}`), else eV and Å, and the "
            "figures say the units are assumed"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    units = None
    if args.units is not None:
        try:
            units = parse_units(args.units)
        except ValueError as err:
            parser.error(str(err))
    try:
        result = make_plots(args.run_dir, args.out, dpi=args.dpi, units=units)
    except NoLogsError as err:
        parser.exit(2, f"nequip-mtl-plot: error: {err}\n")
    for note in result.notes:
        print(f"note: {note}")
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "plots"
    print(f"read {', '.join(str(p) for p in result.logs.sources)}")
    print(f"units: {result.logs.units.describe()}")
    print(f"wrote {len(result.files)} figure(s) to {out}:")
    for path in result.files.values():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
