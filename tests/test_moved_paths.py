"""Old import paths keep working after a module or a name moved (``nequip_mtl._moved``).

Configs and checkpoints hold ``_target_`` strings. Every module of ``nequip_mtl`` is imported,
so that every stub registers its old path in :data:`nequip_mtl._moved.MOVED`; then, for every
entry (whoever made the move):

- the old path, resolved as Hydra resolves a ``_target_``, is the very object of the new
  path, with a ``DeprecationWarning`` that names the new path; the new path gives it without
  one;
- a checkpoint written before the move loads: a real ``nequip-train`` run of the shipped
  ``configs/multifidelity.yaml`` (tiny splits and model, per-dataset energy references and
  readout heads, the ``DatasetMetricNames`` callback) writes a checkpoint; every
  ``_target_`` of its hyper-parameters whose object an old path in ``MOVED`` reaches is
  rewritten to that old path (the form a checkpoint written before the move holds), and
  nequip's ``ModelFromCheckpoint`` builds from it a model that predicts exactly (``torch.equal``)
  what the model of the untouched checkpoint predicts, on frames of both datasets.

Mutations that fail here: a stub removed (its old path no longer imports), a stub forwarding
to the wrong module or name (another object, or an AttributeError), a stub without the
warning, a new path that itself warns (a package export routed through a stub).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate

import nequip_mtl
from nequip_mtl._moved import MOVED
from tests._nequip_train import nequip_train

REPO = Path(__file__).resolve().parents[1]
_MOVED_TO = re.compile(r"has moved to `([^`]+)`")


def _import_every_module() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(nequip_mtl.__path__, prefix="nequip_mtl."):
        importlib.import_module(info.name)
        names.append(info.name)
    return names


MODULES = _import_every_module()


def _is_module(path: str) -> bool:
    return path in MODULES


def _entries() -> list[tuple[str, str]]:
    """``(old, new)`` for every moved name: a moved module's public names one by one."""
    out = []
    for old, new in sorted(MOVED.items()):
        if not _is_module(old):
            out.append((old, new))
            continue
        target = importlib.import_module(new)
        names = getattr(target, "__all__", None) or [
            n for n, v in vars(target).items() if not n.startswith("_") and not _is_foreign(v)
        ]
        out += [(f"{old}.{name}", f"{new}.{name}") for name in names]
    return out


def _is_foreign(value) -> bool:
    """A module, or a class/function of another package, that a module merely imports."""
    module = getattr(value, "__module__", None) or getattr(value, "__name__", "")
    return type(value).__name__ == "module" or not str(module).startswith("nequip_mtl")


def _resolve(path: str) -> tuple[object, list[str]]:
    """The object of ``path`` (as Hydra resolves a ``_target_``) and the new paths named by
    the DeprecationWarnings this raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = get_object(path)
    return obj, _named_new_paths(caught)


def _named_new_paths(caught) -> list[str]:
    """The new paths that the recorded DeprecationWarnings of moved paths name."""
    found = [_MOVED_TO.search(str(w.message)) for w in caught]
    return [
        m.group(1)
        for w, m in zip(caught, found)
        if m is not None and issubclass(w.category, DeprecationWarning)
    ]


def test_the_moves_of_this_package_are_registered():
    """The stubs of the data / model / tools moves are found by importing every module, each
    old name forwarded to the same name at its new home."""
    tools = (
        "DEFAULT_ELEMENTS DEFAULT_RATTLE_AMPLITUDES FRAME_KINDS LATTICE_CONSTANTS "
        "SUPPORTED_ELEMENTS compare_labels generate_frames generate_xtb_md_frames make_dataset "
        "relabel_frames write_frames"
    ).split()
    model = ("DatasetEnergyShifts", "DatasetReadoutHeads", "PerDatasetEnergyReferences")
    expected = {
        "nequip_mtl.data.emt_alloy": "nequip_mtl.tools.emt_alloy",
        "nequip_mtl.data.cli": "nequip_mtl.tools.make_data",
        "nequip_mtl.data.xtb_md": "nequip_mtl.tools.xtb_md",
        "nequip_mtl.data.xtb_md.main": "nequip_mtl.tools.make_xtb_data.main",
        "nequip_mtl.data.xtb_md.build_parser": "nequip_mtl.tools.make_xtb_data.build_parser",
        "nequip_mtl.data.metric_names": "nequip_mtl.train.callbacks.dataset_metric_names",
        "nequip_mtl.data.DatasetMetricNames": "nequip_mtl.train.callbacks.DatasetMetricNames",
        "nequip_mtl.model.references.DATASET_INDEX_KEY": "nequip_mtl.data.keys.DATASET_INDEX_KEY",
        **{f"nequip_mtl.data.{n}": f"nequip_mtl.tools.{n}" for n in tools},
        **{f"nequip_mtl.model.references.{n}": f"nequip_mtl.model.{n}" for n in model},
    }
    assert expected.items() <= MOVED.items()


ENTRIES = _entries()


@pytest.mark.parametrize("old, new", ENTRIES, ids=[old for old, _ in ENTRIES])
def test_old_target_resolves_to_the_new_object_with_a_warning(old, new):
    obj, named = _resolve(old)
    expected, named_by_new = _resolve(new)
    assert obj is expected
    assert new in named, f"`{old}` warned {named}, not naming `{new}`"
    assert not named_by_new, f"the new path `{new}` warns: {named_by_new}"


# ---------------------------------------------------------------- a checkpoint from before

#: the shipped multi-fidelity config, tiny (as tests/test_multifidelity_deployment.py runs it)
DATA_FILES = ["benchmarks/data/ethanol_reduced_100.xyz", "benchmarks/data/ethanol_xtb_1200.xyz"]
TINY = [
    "dft_train=6",
    "dft_val=2",
    "dft_test=92",
    "xtb_train=6",
    "xtb_val=2",
    "xtb_test=1192",
    "num_layers=1",
    "num_features=4",
    "training_module.model.model.radial_mlp_width=8",
    "max_epochs=1",
    "readout_heads=true",
    "run=[train]",
]


def _old_path_of(target: str) -> str | None:
    """An old path in ``MOVED`` that reaches the object ``target`` names (``None``: none)."""
    try:
        obj = get_object(target)
    except Exception:
        return None
    short = target.rpartition(".")[2]
    for old, new in sorted(MOVED.items()):
        if _is_module(old):
            candidate = getattr(importlib.import_module(new), short, None)
            if candidate is obj:
                return f"{old}.{short}"
        elif new.rpartition(".")[2] == short and get_object(new) is obj:
            return old
    return None


def _rewrite_targets(node, rewritten: dict[str, str]):
    """``node`` with every ``_target_`` that an old path reaches written as that old path
    (``rewritten``: old -> new, filled)."""
    if isinstance(node, dict):
        out = {k: _rewrite_targets(v, rewritten) for k, v in node.items()}
        target = node.get("_target_")
        old = _old_path_of(target) if isinstance(target, str) else None
        if old is not None:
            out["_target_"] = old
            rewritten[old] = target
        return out
    if isinstance(node, list):
        return [_rewrite_targets(v, rewritten) for v in node]
    return node


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``nequip-train`` (in this process) of the shipped multi-fidelity config, launched where
    a clone's root has the shipped data files."""
    launch = tmp_path_factory.mktemp("launch")
    for name in DATA_FILES:
        (launch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, launch / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(launch)
        nequip_train(REPO / "configs", "multifidelity", [*TINY, f"hydra.run.dir={launch}/run"])
    return launch / "run" / "last.ckpt"


def _batch(data_config: dict) -> dict:
    """Two training frames of each dataset (so each frame's reference and head are used), from
    the data module the checkpoint's config builds."""
    from nequip.data import AtomicDataDict

    module = instantiate(data_config, _recursive_=False)
    module.prepare_data()
    module.setup("fit")
    try:
        frames = [ds[i] for ds in module.train_dataset for i in range(2)]
    finally:
        module.teardown("fit")
    return AtomicDataDict.batched_from_list(frames)


def test_a_checkpoint_written_before_the_moves_loads_and_predicts_the_same(checkpoint, tmp_path):
    from nequip.model import ModelFromCheckpoint
    from nequip.train.lightning import _SOLE_MODEL_KEY

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    rewritten: dict[str, str] = {}
    saved["hyper_parameters"] = _rewrite_targets(saved["hyper_parameters"], rewritten)
    # at least the per-dataset model builder and the callback of this package's moves
    assert rewritten.get("nequip_mtl.model.references.PerDatasetEnergyReferences") == (
        "nequip_mtl.model.PerDatasetEnergyReferences"
    )
    assert rewritten.get("nequip_mtl.data.DatasetMetricNames") == (
        "nequip_mtl.train.callbacks.DatasetMetricNames"
    )
    before = tmp_path / "before_the_move.ckpt"
    torch.save(saved, before)

    info = saved["hyper_parameters"]["info_dict"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_model = ModelFromCheckpoint(str(before))[_SOLE_MODEL_KEY]
        callbacks = instantiate(info["trainer"]["callbacks"])
        batch = _batch(info["data"])
    new_model = ModelFromCheckpoint(str(checkpoint))[_SOLE_MODEL_KEY]

    # every old path was used, and warned naming where its object is now
    warned = {id(get_object(path)) for path in _named_new_paths(caught)}
    for old, new in rewritten.items():
        assert id(get_object(new)) in warned, f"loading did not use `{old}` (now `{new}`)"
    from nequip_mtl.train.callbacks import DatasetMetricNames

    assert any(type(cb) is DatasetMetricNames for cb in callbacks)

    assert set(batch["dataset_index"].tolist()) == {0, 1}
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)
    got = old_model({k: v.clone() for k, v in batch.items()})
    expected = new_model({k: v.clone() for k, v in batch.items()})
    for key in ("total_energy", "forces"):
        assert torch.equal(got[key], expected[key]), key
