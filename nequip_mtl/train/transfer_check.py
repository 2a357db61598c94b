"""``nequip-mtl-transfer-check``: the transfer check (:mod:`nequip_mtl.diagnostics.transfer`)
on a nequip training config, before any training.

It composes the config as ``nequip-train`` does (``--config-path``, ``--config-name``, then
Hydra overrides), builds the data module and the training module (the model, with the
training-data statistics, and the loss) the way ``nequip-train`` builds them, trains nothing,
and prints how far apart the training datasets are for that model: each dataset's residual
after its energy references and its force RMS, the label differences on the structures two
datasets share, and the cosine of the datasets' loss gradients at the model as built. The
config must use :class:`~nequip_mtl.data.MultiDatasetDataModule`; the gradients need a
per-dataset loss (:func:`~nequip_mtl.train.PerDatasetLoss`).

Example, from the repository root (the overrides are those ``nequip-train`` takes)::

    nequip-mtl-transfer-check --config-path configs --config-name multifidelity
    nequip-mtl-transfer-check --config-path configs --config-name multifidelity \\
        dft_train=40 --frames 8 --batches 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._argtypes import positive_float, positive_int
from ..diagnostics.transfer import (
    DEFAULT_TOLERANCE,
    TransferCheck,
    balanced_batches,
    dataset_gradients,
    transfer_check,
)

__all__ = ["main", "build_parser", "compose_config", "check_config", "check_modules"]

PROG = "nequip-mtl-transfer-check"
_DATA_MODULE = "nequip_mtl.data.MultiDatasetDataModule"


class ConfigError(ValueError):
    """The config cannot be checked (printed as the command's error)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Before training several datasets (levels of theory) jointly: how far apart are "
            "they for the model? Builds the data module and the model of a nequip config as "
            "nequip-train does, trains nothing, and prints, per dataset, the RMS energy per "
            "atom left after its least-squares per-type energy references and its force RMS; "
            "on structures two datasets share, their energy and force differences; and the "
            "cosine of the datasets' loss gradients at the model as built. The config's data "
            f"module must be {_DATA_MODULE}."
        ),
        epilog=(
            "Example, from the nequip-mtl repository root: "
            f"{PROG} --config-path configs --config-name multifidelity dft_train=40. "
            "What each number means: docs/multifidelity.md, 'Before training: the transfer "
            "check'."
        ),
    )
    parser.add_argument(
        "--config-path",
        "-cp",
        required=True,
        help="the directory of the config (relative to the current directory, or absolute)",
    )
    parser.add_argument(
        "--config-name", "-cn", required=True, help="the config's name (without .yaml)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, as nequip-train takes them (e.g. dft_train=40)",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=4,
        help="frames of each dataset in every gradient batch (default: 4)",
    )
    parser.add_argument(
        "--batches",
        type=positive_int,
        default=16,
        help=(
            "balanced batches the gradients are averaged over; the cosine's standard error "
            "over them is printed beside it (default: 16)"
        ),
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=DEFAULT_TOLERANCE,
        help=(
            "positions (and cells) closer than this, in the data's length unit, are the same "
            f"structure (default: {DEFAULT_TOLERANCE:g})"
        ),
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="DATASET",
        help=(
            "the high-fidelity dataset that the others are compared against "
            "(default: the config's data.primary, else its first dataset)"
        ),
    )
    parser.add_argument(
        "--device", default="cpu", help="where the gradients are computed (default: cpu)"
    )
    return parser


def compose_config(config_path: str | os.PathLike, config_name: str, overrides: Sequence[str]):
    """The config ``nequip-train --config-path P --config-name N *overrides`` runs, with its
    ``hydra`` node set (so ``${hydra:runtime.cwd}`` resolves to the current directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    config_dir = Path(config_path).expanduser().resolve()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no config `{config_name}.yaml` in {config_dir} (--config-path)")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            config = compose(
                config_name=config_name, overrides=list(overrides), return_hydra_config=True
            )
    except HydraException as err:  # a bad override: Hydra's own message says which
        raise ConfigError(str(err)) from err
    HydraConfig.instance().set_config(config)
    return config


def _resolved(config, section: str) -> dict:
    """The config's ``section`` with every interpolation resolved; a failure (a missing
    file, an unknown key) is the command's error, naming the section."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(config[section], resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"resolving `{section}` of the config: {err}") from err


def _build(config):
    """``(data module, training module)`` built as ``nequip-train`` builds them."""
    from hydra.utils import get_class, instantiate
    from nequip.model import override_model_compile_mode
    from nequip.utils.global_state import set_global_state
    from omegaconf import OmegaConf

    from ..data import MultiDatasetDataModule
    from ..data.binding import bind_dataset_names

    for section in ("data", "training_module"):
        if section not in config:
            raise ConfigError(f"the config has no `{section}` section")
    if "model" not in config.training_module:
        raise ConfigError("the config has no `training_module.model`")
    set_global_state()
    data = _resolved(config, "data")
    target = data.get("_target_")
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except Exception:  # noqa: BLE001  (hydra raises several kinds for a bad path)
        cls = None
    if cls is None or not issubclass(cls, MultiDatasetDataModule):
        raise ConfigError(
            f"`data._target_` is {target!r}: the transfer check compares the training datasets "
            f"of a {_DATA_MODULE} (several named datasets); a single-dataset data module has "
            "nothing to compare"
        )
    datamodule = instantiate(data, _recursive_=False)
    if len(datamodule.dataset_names) < 2:
        raise ConfigError(
            f"`data.datasets` has one dataset ({datamodule.dataset_names}): the transfer check "
            "compares two or more"
        )
    stats = datamodule.get_statistics(dataset="train")

    def training_data_stats(name: str):
        value = stats.get(name, None)
        if value is None:
            raise ConfigError(
                f"the config asks for the data statistic `{name}`, which `data.stats_manager` "
                "does not compute"
            )
        return value

    OmegaConf.register_new_resolver(
        "training_data_stats", training_data_stats, use_cache=True, replace=True
    )
    try:
        module_cfg = _resolved(config, "training_module")
    finally:
        OmegaConf.clear_resolver("training_data_stats")
    # the readings do not depend on train-time compile, and several backward passes through
    # one compiled graph are what it does not support (docs/compile.md): built eager
    with override_model_compile_mode("eager"):
        module = instantiate(
            module_cfg,
            _recursive_=False,
            _convert_="all",
            num_datasets=datamodule.num_datasets,
            info_dict={},
        )
    bind_dataset_names(module, datamodule.dataset_names)
    return datamodule, module


def check_config(
    config,
    frames: int = 4,
    batches: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: str | None = None,
    device: str = "cpu",
) -> TransferCheck:
    """The transfer check of a composed nequip config (:func:`compose_config`)."""
    from omegaconf import OmegaConf

    datamodule, module = _build(config)
    result = check_modules(datamodule, module, frames, batches, tolerance, reference, device)
    if "ckpt_path" in config:
        result.notes.append(
            "`ckpt_path` (a restart) is not read: the check uses the model the config builds; "
            "for a pretrained model, build it in `training_module.model` (e.g. nequip's "
            "ModelFromCheckpoint or ModelFromPackage)."
        )
    units = config.get("units")
    if units is not None:
        units = OmegaConf.to_container(units, resolve=True)
        result.units = units if isinstance(units, dict) else {"energy": str(units)}
    return result


def check_modules(
    datamodule,
    module,
    frames: int = 4,
    batches: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: str | None = None,
    device: str = "cpu",
) -> TransferCheck:
    """The transfer check of a built several-dataset data module and training module, its
    dataset names bound (as :func:`check_config` builds them): the readings of the training
    splits, and the gradient cosine over ``batches`` balanced batches of ``frames`` frames of
    each dataset at the module's model."""
    from .task_kinds import component_datasets

    names = list(datamodule.dataset_names)
    reference = datamodule.primary if reference is None else reference
    if reference not in names:
        raise ConfigError(f"--reference {reference!r} is not one of the datasets {names}")
    model = next(iter(module.model.values()))
    type_names = list(model.type_names)
    datamodule.setup("fit")
    try:
        train = list(datamodule.train_dataset)
        result = transfer_check(dict(zip(names, train)), type_names, reference, tolerance)
        components = component_datasets(module.loss)
        active = [n for n, e in module.loss.entries.items() if e.coeff is not None]
        no_dataset = [n for n in active if components.get(n) is None]
        if no_dataset:
            result.notes.append(
                f"Gradient cosine not measured: the loss components {no_dataset} keep no one "
                "dataset's frames; it needs a per-dataset loss "
                "(`training_module.loss._target_: nequip_mtl.train.PerDatasetLoss`)."
            )
        else:
            module.to(device)
            data = [
                {k: v.to(device) for k, v in b.items()}
                for b in balanced_batches(train, frames, batches, seed=datamodule.seed)
            ]
            result.gradients = dataset_gradients(
                module,
                module.loss,
                components,
                data,
                [p for p in module.model.parameters() if p.requires_grad],
                target=lambda b: module.process_target(b, 0, 0),
                frames_per_dataset=frames,
            )
    finally:
        datamodule.teardown("fit")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # overrides and options in any order, as nequip-train's command line allows
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    try:
        config = compose_config(args.config_path, args.config_name, args.overrides)
        result = check_config(
            config,
            frames=args.frames,
            batches=args.batches,
            tolerance=args.tolerance,
            reference=args.reference,
            device=args.device,
        )
    except ConfigError as err:
        parser.exit(2, f"{PROG}: error: {err}\n")
    print(result.table())
    print(f"({time.perf_counter() - start:.1f} s; nothing was trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
