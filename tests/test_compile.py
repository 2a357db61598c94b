"""Train-time compile (``compile_mode: compile``) with several backward passes per step.

The fault (docs/compile.md): a backward graph compiled with donated buffers by a
one-backward run of the same model (nequip's plain module, FAMO, ...) is loaded from
Inductor's FX graph cache by a several-backward run; its second backward pass reads
overwritten activations (NaN or silently wrong task gradients). Each setting here
therefore first "poisons" an isolated compile cache the way a user does: a plain
``nequip.train.NequIPLightningModule`` step of the same model in another process. Then
every module's parameters after a few SGD steps under compile must equal the eager
run's, within the tolerances nequip's own train-time-compile tests use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nequip.data.datamodule import ASEDataModule
from nequip.train import NequIPLightningModule
from nequip.utils.versions import _TORCH_GE_2_6

from nequip_mtl.tools import make_dataset
from nequip_mtl.train import (
    ConFIGLightningModule,
    EMAConFIGLightningModule,
    FAMOLightningModule,
    MultitaskLightningModule,
    UncertaintyWeightingLightningModule,
)
from tests import _harness as h

pytestmark = pytest.mark.skipif(not _TORCH_GE_2_6, reason="train-time compile needs torch>=2.6")

REPO = Path(__file__).resolve().parents[1]
# nequip/utils/unittests/model_tests_train_time_compile.py
TOL = {"float64": 1e-12, "float32": 5e-5}
STEPS = 2
ALLOY = ["Cu", "Ni", "Pd"]
EF = {"total_energy": 1.0, "forces": 1.0}
EFS = {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}


# ---------------------------------------------------------------- settings


def _model(species: str, dtype: str, compile_mode: str) -> dict:
    cfg = h.model_config(dtype)
    if species == "alloy":
        cfg["type_names"] = ALLOY
        cfg["per_type_energy_shifts"] = {s: -3.0 for s in ALLOY}
        cfg["per_type_energy_scales"] = {s: 0.5 for s in ALLOY}
    cfg["compile_mode"] = compile_mode
    return cfg


def _data(species: str, data_dir: str):
    if species == "Cu":
        return h.datamodule(batch_size=4)
    path = Path(data_dir) / "alloy.xyz"
    if not path.exists():
        make_dataset(path, num_frames=12, seed=0, elements=ALLOY, num_compositions=2)
    return ASEDataModule(
        seed=1,
        split_dataset={"file_path": str(path), "train": 8, "val": 4},
        transforms=[
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": ALLOY,
            },
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.0},
        ],
        train_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": 4},
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": 4},
    )


def _loss(coeffs: dict, target: str | None) -> dict:
    """nequip's (or nequip_mtl's, ``target``) energy-force(-stress) loss with ``coeffs``."""
    loss = h.loss_config(dict(coeffs))
    if "stress" not in coeffs:
        loss["_target_"] = "nequip.train.EnergyForceLoss"
    if target is not None:
        loss["_target_"] = target if "stress" in coeffs else target.replace("Stress", "")
    return loss


def _fit(
    cls,
    species,
    dtype,
    coeffs,
    compile_mode,
    data_dir,
    tmp_path,
    loss_target=None,
    shared=None,
    **kw,
):
    """Fit ``STEPS`` SGD steps. ``shared``: a dict through which compiled modules share the
    compiled graph (it takes the parameters as inputs), so one compile serves every module."""
    loss = _loss(coeffs, loss_target)
    torch.manual_seed(0)
    module = cls(
        **h.module_kwargs(dtype, loss=loss, model=_model(species, dtype, compile_mode), **kw)
    )
    model = module.model["sole_model"]
    if shared is not None and compile_mode == "compile":
        if shared:
            model._compiled_cache = shared["cache"]
            model.weight_names, model.buffer_names = shared["names"]
        else:
            shared["cache"] = model._compiled_cache
    tr = h.trainer(tmp_path, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0)
    tr.fit(module, datamodule=_data(species, data_dir))
    if shared is not None and compile_mode == "compile" and "names" not in shared:
        shared["names"] = (model.weight_names, model.buffer_names)
    return module


def poison_main(species: str, dtype: str, coeffs: str, data_dir: str) -> None:
    """One compiled step of nequip's plain module (one backward, donated buffers on)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _fit(
            NequIPLightningModule,
            species,
            dtype,
            {k: 1.0 for k in coeffs.split(",")},
            "compile",
            data_dir,
            Path(tmp),
        )


def _poison(cache: Path, species: str, dtype: str, coeffs: dict, data_dir: Path) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    code = (
        "from tests.test_compile import poison_main; "
        f"poison_main({species!r}, {dtype!r}, {','.join(coeffs)!r}, {str(data_dir)!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """An isolated Inductor/AOTAutograd cache for this module's compiles, restored after."""
    path = tmp_path_factory.mktemp("inductor_cache")
    saved = (torch._functorch.config.donated_buffer, torch.compiler.config.cache_key_tag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
        yield path
    torch._functorch.config.donated_buffer, torch.compiler.config.cache_key_tag = saved


def test_prepare_several_backward_passes_sets_no_donation_and_own_cache_tag():
    from nequip_mtl.train._compile import CACHE_KEY_TAG, prepare_several_backward_passes

    # torch's config modules hide an option that pytest's monkeypatch restores by
    # deleting it: save and restore by hand
    saved = (torch._functorch.config.donated_buffer, torch.compiler.config.cache_key_tag)
    try:
        torch._functorch.config.donated_buffer = True
        torch.compiler.config.cache_key_tag = "user-tag"
        prepare_several_backward_passes()
        prepare_several_backward_passes()  # idempotent
        assert torch._functorch.config.donated_buffer is False
        assert torch.compiler.config.cache_key_tag == f"user-tag+{CACHE_KEY_TAG}"
        # every gradient-aggregation module calls it before its model is built (compiled)
        torch.compiler.config.cache_key_tag = ""
        ConFIGLightningModule(**h.module_kwargs())
        assert torch.compiler.config.cache_key_tag == CACHE_KEY_TAG
    finally:
        torch._functorch.config.donated_buffer, torch.compiler.config.cache_key_tag = saved


MODULES = {
    "ConFIG": (ConFIGLightningModule, {}),
    "UPGrad": (
        MultitaskLightningModule,
        {"aggregator": {"_target_": "nequip_mtl.aggregators.UPGrad"}},
    ),
    "MomentumConFIG-1": (
        MultitaskLightningModule,
        {"aggregator": {"_target_": "nequip_mtl.aggregators.MomentumConFIG", "tasks_per_step": 1}},
    ),
    "MomentumConFIG-2": (
        MultitaskLightningModule,
        {"aggregator": {"_target_": "nequip_mtl.aggregators.MomentumConFIG", "tasks_per_step": 2}},
    ),
    "EMAConFIG": (EMAConFIGLightningModule, {}),
    "FAMO": (FAMOLightningModule, {"loss_target": "nequip_mtl.train.EnergyForceStressLoss"}),
    "Uncertainty": (
        UncertaintyWeightingLightningModule,
        {"loss_target": "nequip_mtl.train.EnergyForceStressLoss"},
    ),
}


def _check_compiled_matches_eager(names, species, dtype, coeffs, cache, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _poison(cache, species, dtype, coeffs, data_dir)
    failures, shared = [], {}
    for name in names:
        cls, kw = MODULES[name]
        runs = {}
        for mode in ("eager", "compile"):
            runs[mode] = _fit(
                cls, species, dtype, coeffs, mode, data_dir, tmp_path / name, shared=shared, **kw
            )
        eager, compiled = runs["eager"], runs["compile"]
        assert compiled.model["sole_model"].is_compile_graph_model
        init = h.params(_fit_init(cls, species, dtype, coeffs, kw))
        diff = float((h.params(compiled) - h.params(eager)).abs().max())
        moved = float((h.params(eager) - init).abs().max())
        skipped = getattr(compiled, "skipped_steps", 0)
        # moved > 2 tol: parameters left unchanged by compiled training cannot pass
        if not (diff <= TOL[dtype] and skipped == 0 and moved > 2 * TOL[dtype]):
            failures.append(
                f"{name}: max|compiled-eager|={diff:.3g} (eager moved {moved:.3g}) "
                f"skipped={skipped}"
            )
    assert not failures, failures


def _fit_init(cls, species, dtype, coeffs, kw):
    """The parameters before training (same seed as :func:`_fit`)."""
    loss = _loss(coeffs, kw.get("loss_target"))
    extra = {k: v for k, v in kw.items() if k != "loss_target"}
    torch.manual_seed(0)
    return cls(**h.module_kwargs(dtype, loss=loss, model=_model(species, dtype, "eager"), **extra))


@pytest.mark.slow
def test_single_species_float64_energy_forces_stress(compile_cache, tmp_path):
    """The repro setting (single-species Cu, float64, E+F+S), every kind of module."""
    _check_compiled_matches_eager(list(MODULES), "Cu", "float64", EFS, compile_cache, tmp_path)


@pytest.mark.slow
def test_multi_species_float32_energy_forces(compile_cache, tmp_path):
    names = ["ConFIG", "MomentumConFIG-2"]
    _check_compiled_matches_eager(names, "alloy", "float32", EF, compile_cache, tmp_path)


# ---------------------------------------------------------------- nequip-train


def _cu_frames(path: Path, num_frames: int) -> None:
    """Rattled 32-atom fcc Cu with EMT labels, as `repro/compile_nan/make_cu_emt.py`."""
    import ase.io
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(0)
    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    frames = []
    for _ in range(num_frames):
        a = base.copy()
        a.positions += rng.normal(scale=0.1, size=a.positions.shape)
        a.cell *= 1 + rng.normal(scale=0.01)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")


def _nequip_train(run_dir: Path, env: dict, *overrides: str) -> None:
    cmd = [
        str(Path(sys.executable).parent / "nequip-train"),
        "-cp",
        str(REPO / "tests" / "configs"),
        "-cn",
        "cu_compile_float64",
        f"hydra.run.dir={run_dir}",
        "data.split_dataset.train=10",
        "data.split_dataset.val=5",
        "data.split_dataset.test=5",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_nequip_train_repro_config_trains_after_one_backward_run(tmp_path):
    """The repro config, run after nequip's one-backward module filled the compile cache."""
    import csv

    data = tmp_path / "cu_emt.xyz"
    _cu_frames(data, 20)
    env = dict(
        os.environ,
        REPRO_DATA=str(data),
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
    )
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    # the repro model, smaller (the fault does not depend on its size; compiling does)
    small = (
        "training_module.model.num_layers=1",
        "training_module.model.num_features=4",
        "training_module.model.radial_mlp_width=4",
    )
    _nequip_train(
        tmp_path / "plain",
        env,
        "training_module._target_=nequip.train.NequIPLightningModule",
        "run=[train]",
        "++trainer.limit_train_batches=1",
        *small,
    )
    run = tmp_path / "config"
    _nequip_train(run, env, "trainer.max_epochs=2", "trainer.log_every_n_steps=1", *small)
    (metrics,) = run.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    val = [float(r["val0_epoch/weighted_sum"]) for r in rows if r.get("val0_epoch/weighted_sum")]
    skipped = [float(r["mtl/skipped_steps"]) for r in rows if r.get("mtl/skipped_steps")]
    assert len(val) == 2 and abs(val[1] - val[0]) > 1e-6 * abs(val[0]), val
    assert skipped and max(skipped) == 0.0, skipped
