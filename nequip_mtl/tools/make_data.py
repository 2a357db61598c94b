"""``nequip-mtl-make-data``: write the seeded EMT alloy data set to an extended-XYZ file.

Example::

    nequip-mtl-make-data data/alloy.xyz --frames 150 --seed 0 --elements Cu,Ni,Pd
    # one family per file, e.g. pretrain on bulk, fine-tune on surfaces:
    nequip-mtl-make-data data/bulk.xyz --kind bulk --frames 200 --seed 0
    nequip-mtl-make-data data/slab.xyz --kind slab --frames 200 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from .._argtypes import fraction, positive_int
from .emt_alloy import (
    DEFAULT_ELEMENTS,
    FRAME_KINDS,
    SUPPORTED_ELEMENTS,
    generate_frames,
    write_frames,
)


def _elements(text: str) -> list[str]:
    elements = [e.strip() for e in text.split(",") if e.strip()]
    if not elements:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as Cu,Ni,Pd")
    unknown = [e for e in elements if e not in SUPPORTED_ELEMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unsupported element(s) {','.join(unknown)}; choose from {','.join(SUPPORTED_ELEMENTS)}"
        )
    if len(set(elements)) != len(elements):
        raise argparse.ArgumentTypeError(f"duplicate elements in {text!r}")
    return elements


def _type_names(elements) -> str:
    """``model_type_names: [Cu, Ni, Pd]``, as written in a YAML config."""
    return f"model_type_names: [{', '.join(elements)}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nequip-mtl-make-data",
        description=(
            "Generate a seeded multitask data set (EMT energies, forces and stresses of "
            "strained, rattled fcc alloys with vacancies and surface slabs) as extended XYZ, "
            "readable by nequip.data.dataset.ASEDataset. Same arguments -> identical file."
        ),
        epilog=(
            "The training config's `model_type_names` must list the same elements as "
            f"--elements: configs/tutorial.yaml has {_type_names(DEFAULT_ELEMENTS)}, for "
            "the default elements; change both together when generating other elements."
        ),
    )
    parser.add_argument("output", help="output file, e.g. data/alloy.xyz (extended XYZ)")
    parser.add_argument(
        "--frames", type=positive_int, default=150, help="number of frames (default: 150)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--elements",
        type=_elements,
        default=list(DEFAULT_ELEMENTS),
        help=(
            f"comma-separated alloy elements from {','.join(SUPPORTED_ELEMENTS)} "
            f"(default: {','.join(DEFAULT_ELEMENTS)}); the config's `model_type_names` "
            "must list the same elements"
        ),
    )
    parser.add_argument(
        "--compositions",
        type=positive_int,
        default=4,
        help="number of distinct random compositions (default: 4)",
    )
    parser.add_argument(
        "--kind",
        choices=FRAME_KINDS,
        default="mixed",
        help=(
            "mixed: bulk, vacancy and slab frames in one file (default); bulk, vacancy or slab: "
            "every frame of that family (a vacancy frame loses 1-2 atoms), e.g. a pair of "
            "files for fine-tuning across a distribution shift"
        ),
    )
    parser.add_argument(
        "--vacancy-fraction",
        type=fraction,
        default=None,
        help="with --kind mixed: fraction of bulk frames with vacancies (default: 0.15)",
    )
    parser.add_argument(
        "--slab-fraction",
        type=fraction,
        default=None,
        help="with --kind mixed: fraction of surface-slab frames (default: 0.15)",
    )
    parser.add_argument(
        "--max-vacancies",
        type=positive_int,
        default=None,
        help=(
            "a vacancy frame loses 1 to this many atoms, at most 8 "
            "(default: 1 with --kind mixed, 2 with --kind vacancy)"
        ),
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print a summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fractions = {"--vacancy-fraction": args.vacancy_fraction, "--slab-fraction": args.slab_fraction}
    if args.kind != "mixed":
        given = [name for name, value in fractions.items() if value is not None]
        if given:
            parser.error(
                f"{' and '.join(given)} only apply to --kind mixed, not --kind {args.kind}"
            )
    elif sum(0.15 if v is None else v for v in fractions.values()) > 1.0:
        parser.error("--vacancy-fraction + --slab-fraction must be <= 1")
    if args.max_vacancies is not None and args.max_vacancies > 8:
        parser.error(f"--max-vacancies must be <= 8, got {args.max_vacancies}")

    start = time.perf_counter()
    frames = generate_frames(
        num_frames=args.frames,
        seed=args.seed,
        elements=args.elements,
        num_compositions=args.compositions,
        vacancy_fraction=args.vacancy_fraction,
        slab_fraction=args.slab_fraction,
        kind=args.kind,
        max_vacancies=args.max_vacancies,
    )
    write_frames(frames, args.output)
    if not args.quiet:
        kinds = Counter(a.info["config_type"] for a in frames)
        sizes = [len(a) for a in frames]
        print(
            f"wrote {len(frames)} frames ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; "
            f"{min(sizes)}-{max(sizes)} atoms; elements {','.join(args.elements)}) "
            f"to {args.output} in {time.perf_counter() - start:.1f} s; the training config "
            f"needs {_type_names(args.elements)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
