"""GradientConflictMonitor: logged norms and cosines equal a direct per-task
``torch.autograd.grad`` on the same batch and parameters, for nequip's modules and ours,
and the monitor does not change the training trajectory.

Every run is a real NequIP model trained by a real Lightning Trainer (a few steps); the
reference gradients come from a separate, freshly built module loaded with the
parameters recorded just before each optimizer step.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from nequip.train import ConFIGLightningModule as NequipConFIG
from nequip.train import NequIPLightningModule

from nequip_mtl.diagnostics import (
    conflict_from_gradients,
    conflict_from_weights,
    conflict_metrics,
    conflict_statistics,
)
from nequip_mtl.train import MultitaskLightningModule
from nequip_mtl.train.callbacks.gradient_conflict import GradientConflictMonitor
from tests._harness import datamodule, loss_config, module_kwargs, params, trainer

ALL = ["per_atom_energy_mse", "forces_mse", "stress_mse"]


# ---------------------------------------------------------------- pure math


def test_statistics_from_gram_match_direct_vectors():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    g[1] = -0.3 * g[0] + 0.1 * g[1]  # a conflicting pair
    u = torch.randn(50, generator=gen, dtype=torch.float64)
    stats = conflict_from_gradients(g, u, ["a", "b", "c", "d"])
    cos = torch.nn.functional.cosine_similarity
    for i in range(4):
        assert stats.norms[i].item() == pytest.approx(g[i].norm().item(), rel=1e-12)
        assert stats.cos_update[i].item() == pytest.approx(cos(g[i], u, dim=0).item(), abs=1e-12)
        for j in range(4):
            assert stats.cosines[i, j].item() == pytest.approx(
                cos(g[i], g[j], dim=0).item(), abs=1e-12
            )
    assert stats.cosines[0, 1] < -0.5
    assert stats.update_norm == pytest.approx(u.norm().item(), rel=1e-12)

    # update = w @ G: the Gram matrix alone gives the same numbers
    w = torch.tensor([0.5, 2.0, -1.0, 0.25], dtype=torch.float64)
    via_w = conflict_from_weights(g @ g.T, w, ["a", "b", "c", "d"])
    direct = conflict_from_gradients(g, w @ g, ["a", "b", "c", "d"])
    assert torch.allclose(via_w.cos_update, direct.cos_update, atol=1e-12)
    assert via_w.update_norm == pytest.approx(direct.update_norm, rel=1e-12)

    metrics = conflict_metrics(stats)
    assert metrics["grad_conflict/cos/a~b"] == pytest.approx(stats.cosines[0, 1].item())
    assert "grad_conflict/cos/b~a" not in metrics  # each pair once, in row order
    assert len([k for k in metrics if "/cos/" in k]) == 6


def test_zero_gradient_gives_undefined_cosines_that_are_not_logged():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    stats = conflict_from_gradients(g, torch.tensor([1.0, 0.0]), ["a", "b", "c"])
    assert stats.norms[1] == 0
    assert math.isnan(stats.cosines[0, 1]) and math.isnan(stats.cos_update[1])
    metrics = conflict_metrics(stats)
    assert metrics["grad_conflict/norm/b"] == 0.0
    assert "grad_conflict/cos/a~b" not in metrics and "grad_conflict/cos_update/b" not in metrics
    assert metrics["grad_conflict/cos/a~c"] == pytest.approx(2**-0.5)
    with pytest.raises(ValueError, match="square"):
        conflict_statistics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="together"):
        conflict_statistics(torch.eye(2), update_dots=torch.zeros(2))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"interval": "step", "frequency": 1}, "GradientConflictMonitor.interval"),
        ({"interval": "batch", "frequency": 0}, "GradientConflictMonitor.frequency"),
        ({"interval": "epoch", "frequency": 1.5}, "GradientConflictMonitor.frequency"),
        ({"interval": "batch", "frequency": True}, "GradientConflictMonitor.frequency"),
    ],
)
def test_invalid_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientConflictMonitor(**kwargs)


# ---------------------------------------------------------------- real runs


class StepRecorder(Callback):
    """Records, for every optimizer step, the model parameters before the step, the
    micro-batches of the step, and the update (``.grad``) the optimizer is about to use."""

    def __init__(self):
        self.records: dict[int, dict] = {}
        self._step = None
        self._batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step != trainer.global_step:
            self._step, self._batches = trainer.global_step, []
        self._batches.append(copy.deepcopy(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ps = [p for p in pl_module.model.parameters() if p.requires_grad]
        self.records[trainer.global_step] = {
            "state": copy.deepcopy(pl_module.model.state_dict()),
            "batches": list(self._batches),
            "update": torch.cat([p.grad.detach().reshape(-1).double() for p in ps]),
        }


class ForwardCounter(Callback):
    """Counts forward passes of the model (a forward hook: observation only)."""

    def __init__(self):
        self.count = 0

    def on_fit_start(self, trainer, pl_module):
        for model in pl_module.model.values():  # nequip's ModuleDict of models
            model.register_forward_hook(lambda *a: setattr(self, "count", self.count + 1))


def _run(tmp_path, module_cls, *, monitor=None, extra=(), acc=1, batch_size=4, epochs=1, **kw):
    torch.manual_seed(0)
    module = module_cls(**module_kwargs(**kw))
    callbacks = ([monitor] if monitor is not None else []) + list(extra)
    logger = CSVLogger(str(tmp_path), name="logs", version="")
    tr = trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        accumulate_grad_batches=acc,
    )
    tr.fit(module, datamodule=datamodule(batch_size=batch_size))
    return module, tr


def _logged(tmp_path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of the grad_conflict records in metrics.csv."""
    out: dict[int, dict[str, float]] = {}
    with open(Path(tmp_path) / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            vals = {k: float(v) for k, v in row.items() if k.startswith("grad_conflict/") and v}
            if vals:
                out.setdefault(int(row["step"]), {}).update(vals)
    return out


def _reference(module_cls, record, names, acc, **kw) -> dict[str, float]:
    """Norms and cosines from a direct per-task torch.autograd.grad on a fresh module."""
    ref = module_cls(**module_kwargs(**kw))
    ref.model.load_state_dict(record["state"])
    ps = [p for p in ref.model.parameters() if p.requires_grad]
    grads = {n: torch.zeros_like(record["update"]) for n in names}
    for batch in record["batches"]:
        out = ref(batch)
        losses = ref.loss(out, ref.process_target(batch, 0))
        for n in names:
            g = torch.autograd.grad(losses[n] / acc, ps, retain_graph=True, allow_unused=True)
            grads[n] += torch.cat(
                [(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, ps)]
            ).double()
    cos = torch.nn.functional.cosine_similarity
    u = record["update"]
    expected = {}
    for i, a in enumerate(names):
        expected[f"grad_conflict/norm/{a}"] = grads[a].norm().item()
        expected[f"grad_conflict/cos_update/{a}"] = cos(grads[a], u, dim=0).item()
        for b in names[i + 1 :]:
            expected[f"grad_conflict/cos/{a}~{b}"] = cos(grads[a], grads[b], dim=0).item()
    expected["grad_conflict/update_norm"] = u.norm().item()
    return expected


CASES = {
    # nequip's own module: extra per-task backward passes at monitored steps
    "nequip": dict(module_cls=NequIPLightningModule, source="autograd"),
    # gradient accumulation: task gradients of the whole effective batch
    "nequip_accumulate": dict(
        module_cls=NequIPLightningModule, source="autograd", acc=2, batch_size=2
    ),
    # 8 frames in micro-batches of 3: windows of 2 and then 1 micro-batch per epoch (the
    # last, incomplete window still has Lightning's 1/2, as .grad does)
    "nequip_accumulate_uneven": dict(
        module_cls=NequIPLightningModule, source="autograd", acc=2, batch_size=3
    ),
    # `coeff: null` components are not tasks
    "nequip_null_stress": dict(
        module_cls=NequIPLightningModule,
        source="autograd",
        loss=loss_config({"total_energy": 1.0, "forces": 3.0, "stress": None}),
        names=["per_atom_energy_mse", "forces_mse"],
    ),
    # nequip's ConFIG: manual optimization
    "nequip_config": dict(module_cls=NequipConFIG, source="autograd"),
    # our module: the module's own Gram matrix and weights are reused
    "mtl_config": dict(module_cls=MultitaskLightningModule, source="module"),
    "mtl_null_energy": dict(
        module_cls=MultitaskLightningModule,
        source="module",
        loss=loss_config({"total_energy": None, "forces": 1.0, "stress": 2.0}),
        names=["forces_mse", "stress_mse"],
    ),
    "mtl_upgrad_accumulate": dict(
        module_cls=MultitaskLightningModule,
        source="module",
        acc=2,
        batch_size=2,
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    ),
    # a non-Gram aggregator (only one task back-propagated per step): autograd fallback
    "mtl_momentum_config": dict(
        module_cls=MultitaskLightningModule,
        source="autograd",
        aggregator={"_target_": "nequip_mtl.aggregators.MomentumConFIG"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_values_equal_direct_per_task_autograd(tmp_path, case):
    spec = dict(CASES[case])
    module_cls, source = spec.pop("module_cls"), spec.pop("source")
    names = spec.pop("names", ALL)
    acc = spec.pop("acc", 1)
    batch_size = spec.pop("batch_size", 4)
    monitor = GradientConflictMonitor(interval="batch", frequency=1)
    recorder = StepRecorder()
    _run(
        tmp_path,
        module_cls,
        monitor=monitor,
        extra=[recorder],
        acc=acc,
        batch_size=batch_size,
        **spec,
    )

    logged = _logged(tmp_path)
    assert monitor.last_source == source
    assert sorted(logged) == sorted(recorder.records) == [0, 1]  # every step, each once
    for step, record in recorder.records.items():
        expected = _reference(module_cls, record, names, acc, **spec)
        assert set(logged[step]) == set(expected), step
        for key, value in expected.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
    # the pair names the issue asks for
    if "stress_mse" in names:
        assert "grad_conflict/cos/forces_mse~stress_mse" in logged[0]
    for dropped in set(ALL) - set(names):  # `coeff: null`: not a task
        assert not any(dropped in k for k in logged[0])
    assert monitor.last_metrics == logged[1]


MODULES = {
    "nequip": dict(module_cls=NequIPLightningModule),
    "nequip_accumulate": dict(module_cls=NequIPLightningModule, acc=2, batch_size=2),
    "nequip_config": dict(module_cls=NequipConFIG),
    "mtl_config": dict(module_cls=MultitaskLightningModule),
    "mtl_momentum_config": dict(
        module_cls=MultitaskLightningModule,
        aggregator={"_target_": "nequip_mtl.aggregators.MomentumConFIG"},
    ),
}


@pytest.mark.parametrize("case", list(MODULES))
def test_monitor_does_not_change_training(tmp_path, case):
    spec = dict(MODULES[case])
    cls = spec.pop("module_cls")
    plain, _ = _run(tmp_path / "plain", cls, epochs=2, **spec)
    monitor = GradientConflictMonitor(interval="batch", frequency=1)
    watched, tr = _run(tmp_path / "watched", cls, monitor=monitor, epochs=2, **spec)
    assert monitor.last_step == tr.global_step - 1  # it ran on the last step too
    assert torch.equal(params(plain), params(watched))
    # the module's own loss metrics (epoch loss, last step values) are untouched
    assert plain.loss.metrics_values_epoch == watched.loss.metrics_values_epoch
    assert plain.loss.metrics_values_step == watched.loss.metrics_values_step


def test_reusing_the_module_gram_costs_no_forward_pass(tmp_path):
    counts = {}
    for cls in (MultitaskLightningModule, NequIPLightningModule):
        for watch in (False, True):
            counter = ForwardCounter()
            monitor = GradientConflictMonitor("batch", 1) if watch else None
            _run(tmp_path / f"{cls.__name__}{watch}", cls, monitor=monitor, extra=[counter])
            counts[cls.__name__, watch] = counter.count
    # 2 training steps (+ validation): ours reuses the Gram matrix, nequip's needs one
    # extra forward per monitored step
    assert counts["MultitaskLightningModule", False] >= 3  # 2 training + validation
    assert counts["MultitaskLightningModule", True] == counts["MultitaskLightningModule", False]
    assert counts["NequIPLightningModule", True] == counts["NequIPLightningModule", False] + 2


def test_a_disabled_monitor_costs_nothing_and_logs_nothing(tmp_path):
    """``enabled: false`` (a config's ``monitor_conflicts=false``): on nequip's weighted-sum
    module, as many forward passes as without the monitor and no ``grad_conflict/*``
    column. Fails if a disabled monitor still measures."""
    counts = {}
    for watch in (None, False):
        counter = ForwardCounter()
        monitor = None if watch is None else GradientConflictMonitor("batch", 1, enabled=False)
        _run(tmp_path / str(watch), NequIPLightningModule, monitor=monitor, extra=[counter])
        counts[watch] = counter.count
        if monitor is not None:
            assert monitor.last_metrics == {} and monitor.last_source is None
    assert counts[False] == counts[None]
    assert _logged(tmp_path / "False") == {}
    with pytest.raises(TypeError, match="GradientConflictMonitor.enabled"):
        GradientConflictMonitor("batch", 1, enabled="no")


class ForwardsPerBatch(Callback):
    """Forward passes of the model between consecutive micro-batch ends, and the
    ``global_step`` at each micro-batch's start."""

    def __init__(self, counter: ForwardCounter):
        self.counter, self.deltas, self.steps, self._last = counter, [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.deltas.append(self.counter.count - self._last)
        self._last = self.counter.count

    def on_validation_start(self, trainer, pl_module):
        self._val_start = self.counter.count

    def on_validation_end(self, trainer, pl_module):
        self._last += self.counter.count - self._val_start


def test_accumulation_extra_passes_once_per_optimizer_step(tmp_path):
    """With accumulate_grad_batches=2, a monitored step's extra passes run once, at its
    optimizer step (after the window's last micro-batch), one forward per micro-batch of
    the window; unmonitored windows cost nothing."""
    counter = ForwardCounter()
    per_batch = ForwardsPerBatch(counter)
    monitor = GradientConflictMonitor(interval="batch", frequency=2)
    _run(
        tmp_path,
        NequIPLightningModule,
        monitor=monitor,
        extra=[counter, per_batch],
        acc=2,
        batch_size=2,
        epochs=2,
    )
    # 4 micro-batches per epoch = 2 optimizer steps; steps 0 and 2 are monitored
    assert per_batch.steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert per_batch.deltas == [1, 1 + 2, 1, 1, 1, 1 + 2, 1, 1]
    assert sorted(_logged(tmp_path)) == [0, 2]


@pytest.mark.parametrize(
    "interval, frequency, epochs, expected",
    [
        ("batch", 3, 3, [0, 3]),  # 2 steps per epoch: steps 0..5
        ("epoch", 2, 3, [0, 4]),  # first step of epochs 0 and 2
        ("epoch", 1, 2, [0, 2]),
    ],
)
def test_schedule(tmp_path, interval, frequency, epochs, expected):
    monitor = GradientConflictMonitor(interval=interval, frequency=frequency)
    counter = ForwardCounter()
    plain_counter = ForwardCounter()
    _run(tmp_path, NequIPLightningModule, monitor=monitor, extra=[counter], epochs=epochs)
    _run(tmp_path / "plain", NequIPLightningModule, extra=[plain_counter], epochs=epochs)
    assert sorted(_logged(tmp_path)) == expected
    # extra passes only at the monitored steps
    assert counter.count - plain_counter.count == len(expected)


def test_non_nequip_module_is_rejected(tmp_path):
    import lightning

    class Plain(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

    monitor = GradientConflictMonitor("batch", 1)
    with pytest.raises(TypeError, match="GradientConflictMonitor needs"):
        monitor.setup(trainer(tmp_path), Plain(), "fit")


# ---------------------------------------------------------------- DDP


class _MetricsLog(Callback):
    """Collects the monitor's values after every step (for the DDP comparison)."""

    def __init__(self, monitor):
        self.monitor, self.values = monitor, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(dict(self.monitor.last_metrics))


def _ddp_worker(out_dir: str) -> None:
    """One rank (or the single reference process) of the DDP comparison; launched by
    :func:`test_ddp_two_ranks_match_one_process` with torchrun-style variables."""
    import os

    from lightning.pytorch.strategies import DDPStrategy

    from tests._ddp import end_process_group

    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    for name, cls in (("nequip", NequIPLightningModule), ("mtl", MultitaskLightningModule)):
        torch.manual_seed(0)
        module = cls(**module_kwargs())
        monitor = GradientConflictMonitor("batch", 1)
        log = _MetricsLog(monitor)
        tr = trainer(
            out_dir,
            max_epochs=2,
            devices=world,
            strategy=DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
            callbacks=[monitor, log],
            use_distributed_sampler=True,
        )
        module.world_size = tr.world_size  # as nequip-train does
        # the whole training split is one global batch: per-rank batch 8 / world
        tr.fit(module, datamodule=datamodule(num_frames=10, train=8, val=2, batch_size=8 // world))
        results[name] = {"values": log.values, "source": monitor.last_source}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(results, Path(out_dir) / f"monitor_world{world}.pt")
    end_process_group()


@pytest.mark.ddp
def test_ddp_two_ranks_match_one_process(tmp_path):
    """Under DDP the task gradients are those of the global batch: 2 gloo ranks with
    per-rank batch 4 log the same values as 1 process with batch 8."""
    import sys

    from tests._ddp import launch

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from tests.test_gradient_conflict import _ddp_worker; _ddp_worker(sys.argv[1])"
    )
    for world in (1, 2):
        launch([sys.executable, "-c", code, str(tmp_path)], world, cwd=repo)
    one = torch.load(tmp_path / "monitor_world1.pt")
    two = torch.load(tmp_path / "monitor_world2.pt")
    assert one["nequip"]["source"] == two["nequip"]["source"] == "autograd"
    assert one["mtl"]["source"] == two["mtl"]["source"] == "module"
    for name in ("nequip", "mtl"):
        assert len(one[name]["values"]) == len(two[name]["values"]) == 2  # 2 steps
        for a, b in zip(one[name]["values"], two[name]["values"]):
            assert set(a) == set(b) and len(a) == 10
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (name, key)
