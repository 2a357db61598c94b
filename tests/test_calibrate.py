"""CalibrateLossCoefficients: the coefficients it sets are the documented rule applied to
per-task gradients computed directly here (torch.autograd.grad of each component on the
same batches and parameters); after calibration the run is nequip's plain weighted sum
with those coefficients, at its cost; restarts resume exactly; a real nequip-train run.

Every run is a real tiny NequIP model trained by a real Lightning Trainer (float64, SGD):
8 training frames, batch 4, so 2 optimizer steps per epoch.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from nequip.train import ConFIGLightningModule as NequipConFIG
from nequip.train import NequIPLightningModule
from nequip.train.callbacks import SoftAdapt as NequipSoftAdapt

from nequip_mtl.aggregators import UPGrad
from nequip_mtl.diagnostics import GradientCalibration
from nequip_mtl.train import MultitaskLightningModule, UncertaintyWeightingLightningModule
from nequip_mtl.train.callbacks import (
    CalibrateLossCoefficients,
    LossCoefficientScheduler,
    SoftAdapt,
)
from tests._harness import datamodule, loss_config, module_kwargs, params, trainer
from tests.test_gradient_conflict import StepRecorder

ALL = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
# unequal configured coefficients, so that c0 visibly enters the rules
C0_CONFIG = {"total_energy": 1.0, "forces": 3.0, "stress": 2.0}
C0 = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) / 6.0
UPGRAD = {"_target_": "nequip_mtl.aggregators.UPGrad"}
SUM = {"_target_": "nequip_mtl.aggregators.Sum"}
REPO = Path(__file__).resolve().parents[1]


class BackwardCounter(Callback):
    """Counts, per optimizer step, the gradient computations reaching the model's first
    parameter (one per ``backward`` or ``torch.autograd.grad``): observation only."""

    def __init__(self):
        self.by_step: dict[int, int] = {}
        self._trainer = None

    def on_fit_start(self, trainer, pl_module):
        self._trainer = trainer
        first = next(p for p in pl_module.model.parameters() if p.requires_grad)
        first.register_hook(self._count)

    def _count(self, grad):
        step = self._trainer.global_step
        self.by_step[step] = self.by_step.get(step, 0) + 1


class StateAt(Callback):
    """Copies the model's state right after optimizer step ``step`` (global_step == step)."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.state is None:
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def _fit(
    tmp_path,
    module_cls,
    callbacks,
    *,
    epochs=2,
    acc=1,
    batch_size=4,
    ckpt_path=None,
    checkpoint=False,
    **kw,
):
    torch.manual_seed(0)
    kw.setdefault("loss", loss_config(C0_CONFIG))
    module = module_cls(**module_kwargs(**kw))
    callbacks = list(callbacks)
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True))
    tr = trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=callbacks,
        accumulate_grad_batches=acc,
        enable_checkpointing=checkpoint,
    )
    tr.fit(module, datamodule=datamodule(batch_size=batch_size), ckpt_path=ckpt_path)
    return module, tr


def _direct_grams(module_cls, records, steps, acc, **kw) -> list[torch.Tensor]:
    """Per step, the Gram matrix of the gradients of the raw components, each computed
    with its own torch.autograd.grad on a fresh module holding that step's parameters."""
    kw.setdefault("loss", loss_config(C0_CONFIG))
    grams = []
    for step in steps:
        record = records[step]
        ref = module_cls(**module_kwargs(**kw))
        ref.model.load_state_dict(record["state"])
        ps = [p for p in ref.model.parameters() if p.requires_grad]
        rows = torch.zeros(len(ALL), sum(p.numel() for p in ps), dtype=torch.float64)
        for batch in record["batches"]:
            losses = ref.loss(ref(batch), ref.process_target(batch, 0))
            for i, name in enumerate(ALL):
                g = torch.autograd.grad(losses[name] / acc, ps, retain_graph=True)
                rows[i] += torch.cat([x.reshape(-1) for x in g]).double()
        grams.append(rows @ rows.T)
    return grams


def _expected(rule: str, grams: list[torch.Tensor], aggregator=None) -> torch.Tensor:
    """The documented rules, written out independently of GradientCalibration."""
    if rule == "gradnorm":
        mean_norm = torch.stack([g.diagonal().sqrt() for g in grams]).mean(0)
        raw = C0 / mean_norm  # c_i ∝ c0_i / mean_t |grad L_i|
    else:
        raw = torch.stack([aggregator.weights(g, C0) for g in grams]).mean(0)
    return raw / raw.sum()


# ---------------------------------------------------------------- the chosen coefficients

CASES = {
    "nequip_gradnorm": dict(module_cls=NequIPLightningModule, rule="gradnorm"),
    "nequip_upgrad": dict(module_cls=NequIPLightningModule, rule="aggregator"),
    "nequip_upgrad_accumulate": dict(
        module_cls=NequIPLightningModule, rule="aggregator", acc=2, batch_size=2
    ),
    "mtl_sum_gradnorm": dict(module_cls=MultitaskLightningModule, rule="gradnorm", aggregator=SUM),
    "mtl_sum_upgrad": dict(module_cls=MultitaskLightningModule, rule="aggregator", aggregator=SUM),
}


@pytest.mark.parametrize("case", list(CASES))
def test_coefficients_equal_the_rule_on_direct_gradients(tmp_path, case):
    spec = dict(CASES[case])
    module_cls, rule = spec.pop("module_cls"), spec.pop("rule")
    acc, batch_size = spec.pop("acc", 1), spec.pop("batch_size", 4)
    cal = CalibrateLossCoefficients(
        rule=rule, steps=3, aggregator=UPGRAD if rule == "aggregator" else None
    )
    recorder = StepRecorder()
    module, tr = _fit(tmp_path, module_cls, [cal, recorder], acc=acc, batch_size=batch_size, **spec)
    assert tr.global_step == 4 and cal.done and cal.calibration.num_steps == 3
    grams = _direct_grams(module_cls, recorder.records, [0, 1, 2], acc, **spec)
    expected = _expected(rule, grams, UPGrad())
    got = torch.tensor([cal.coefficients[n] for n in ALL], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    # set on the module (and kept: nothing changes them afterwards)
    on_module = torch.tensor([module.loss.entries[n].coeff for n in ALL], dtype=torch.float64)
    torch.testing.assert_close(on_module, expected, rtol=1e-12, atol=0)
    assert (expected - C0).abs().max() > 0.02  # the calibration did move them


def test_sum_aggregator_rule_keeps_the_configured_coefficients(tmp_path):
    """Closed form: the Sum aggregator's weights are the coefficients themselves."""
    cal = CalibrateLossCoefficients(rule="aggregator", steps=2, aggregator=SUM)
    _fit(tmp_path, NequIPLightningModule, [cal], epochs=1)
    got = torch.tensor([cal.coefficients[n] for n in ALL], dtype=torch.float64)
    torch.testing.assert_close(got, C0, rtol=1e-12, atol=0)
    assert cal.calibration.weight_sum == pytest.approx(1.0, rel=1e-12)


def test_pure_rule_math():
    """GradientCalibration alone, on hand-made Gram matrices (closed forms)."""
    g1 = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))  # norms 2, 1
    g2 = torch.diag(torch.tensor([16.0, 9.0], dtype=torch.float64))  # norms 4, 3
    cal = GradientCalibration(["a", "b"], [0.5, 0.5], "gradnorm")
    assert cal.add(g1) and cal.add(g2)
    assert not cal.add(torch.full((2, 2), float("nan")))  # not counted
    assert cal.num_steps == 2
    # mean norms 3 and 2: c ∝ (1/3, 1/2) -> (0.4, 0.6)
    assert cal.coefficients() == pytest.approx({"a": 0.4, "b": 0.6}, rel=1e-12)
    state = cal.state_dict()
    other = GradientCalibration(["a", "b"], [0.5, 0.5], "gradnorm")
    other.load_state_dict(state)
    assert other.coefficients() == cal.coefficients()

    zero = GradientCalibration(["a", "b"], [0.5, 0.5], "gradnorm")
    zero.add(torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"\['b'\] had a zero gradient"):
        zero.coefficients("here")
    with pytest.raises(ValueError, match="no calibration step"):
        GradientCalibration(["a"], [1.0], "gradnorm").coefficients()

    # aggregator rule: a task with zero gradient gets weight 0 on that step
    agg = GradientCalibration(["a", "b"], [0.25, 0.75], "aggregator", aggregator=UPGrad())
    agg.add(torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    assert agg.mean_weights.tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- after calibration


@pytest.mark.parametrize("rule", ["gradnorm", "aggregator"])
def test_after_calibration_it_is_the_plain_weighted_sum_at_its_cost(tmp_path, rule):
    cal = CalibrateLossCoefficients(
        rule=rule, steps=2, aggregator=UPGRAD if rule == "aggregator" else None
    )
    counter, at = BackwardCounter(), StateAt(2)
    calibrated, tr = _fit(tmp_path / "a", NequIPLightningModule, [cal, counter, at], epochs=3)
    assert tr.global_step == 6
    # 1 training backward + 3 measured components on the 2 calibration steps, then 1
    assert counter.by_step == {0: 4, 1: 4, 2: 1, 3: 1, 4: 1, 5: 1}

    # nequip's plain module, configured with the chosen coefficients, from the state
    # after calibration (SGD: no optimizer state), trained over the same 4 batches
    names = {"per_atom_energy_mse": "total_energy", "forces_mse": "forces", "stress_mse": "stress"}
    chosen = {names[n]: c for n, c in cal.coefficients.items()}
    torch.manual_seed(0)
    plain = NequIPLightningModule(**module_kwargs(loss=loss_config(chosen)))
    plain.model.load_state_dict(at.state)
    plain_counter = BackwardCounter()
    tr2 = trainer(tmp_path / "b", max_epochs=2, callbacks=[plain_counter])
    tr2.fit(plain, datamodule=datamodule())
    assert list(plain_counter.by_step.values()) == [1, 1, 1, 1]
    torch.testing.assert_close(params(plain), params(calibrated), rtol=0, atol=1e-10)

    # the comparison can tell: with the configured coefficients the result differs
    torch.manual_seed(0)
    other = NequIPLightningModule(**module_kwargs(loss=loss_config(C0_CONFIG)))
    other.model.load_state_dict(at.state)
    trainer(tmp_path / "c", max_epochs=2).fit(other, datamodule=datamodule())
    assert (params(other) - params(calibrated)).abs().max() > 1e-6


def test_our_sum_module_reuses_its_gram_matrix_at_no_extra_cost(tmp_path):
    cal = CalibrateLossCoefficients(rule="gradnorm", steps=2)
    counter = BackwardCounter()
    _fit(tmp_path, MultitaskLightningModule, [cal, counter], epochs=2, aggregator=SUM)
    assert cal.done
    assert list(counter.by_step.values()) == [3, 3, 3, 3]  # the module's own passes only


# ---------------------------------------------------------------- restarts


@pytest.mark.parametrize(
    "steps, rule",
    [
        (2, "gradnorm"),  # calibration finished in the first run
        (3, "aggregator"),  # interrupted after 2 of 3 calibration steps
    ],
)
def test_restart_resumes_exactly(tmp_path, steps, rule):
    agg = UPGRAD if rule == "aggregator" else None
    full_cal = CalibrateLossCoefficients(rule=rule, steps=steps, aggregator=agg)
    full, _ = _fit(tmp_path / "full", NequIPLightningModule, [full_cal], epochs=3)

    part_cal = CalibrateLossCoefficients(rule=rule, steps=steps, aggregator=agg)
    _fit(tmp_path / "part", NequIPLightningModule, [part_cal], epochs=1, checkpoint=True)
    assert part_cal.done == (steps == 2)

    cal = CalibrateLossCoefficients(rule=rule, steps=steps, aggregator=agg)
    counter = BackwardCounter()
    resumed, tr = _fit(
        tmp_path / "resumed",
        NequIPLightningModule,
        [cal, counter],
        epochs=3,
        ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"),
    )
    assert tr.global_step == 6
    assert cal.calibration.num_steps == steps
    assert cal.coefficients == full_cal.coefficients
    # extra passes only on the calibration steps the first run had not measured
    assert counter.by_step == {s: (4 if s < steps else 1) for s in range(2, 6)}
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-12)


def test_restart_with_edited_settings(tmp_path):
    part = CalibrateLossCoefficients(rule="gradnorm", steps=3)
    _fit(tmp_path / "part", NequIPLightningModule, [part], epochs=1, checkpoint=True)
    ckpt = str(tmp_path / "part" / "ckpt" / "last.ckpt")
    with pytest.raises(ValueError, match="unfinished calibration"):
        _fit(
            tmp_path / "r",
            NequIPLightningModule,
            [CalibrateLossCoefficients(rule="gradnorm", steps=4)],
            ckpt_path=ckpt,
        )


# ---------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "softmax", "steps": 2}, "CalibrateLossCoefficients.rule"),
        ({"rule": "gradnorm"}, "exactly one of `steps`"),
        ({"rule": "gradnorm", "steps": 2, "epochs": 1}, "exactly one of `steps`"),
        ({"rule": "gradnorm", "steps": 0}, "CalibrateLossCoefficients.steps"),
        ({"rule": "gradnorm", "epochs": -1}, "CalibrateLossCoefficients.epochs"),
        ({"rule": "gradnorm", "steps": 1.5}, "CalibrateLossCoefficients.steps"),
        ({"rule": "aggregator", "steps": 2}, "CalibrateLossCoefficients.aggregator is required"),
        ({"rule": "gradnorm", "steps": 2, "aggregator": UPGRAD}, "only used with `rule: agg"),
        (
            {
                "rule": "aggregator",
                "steps": 2,
                "aggregator": {"_target_": "nequip_mtl.aggregators.MomentumConFIG"},
            },
            "Gram-space aggregator",
        ),
    ],
)
def test_invalid_configuration_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrateLossCoefficients(**kwargs)


def _setup_error(tmp_path, module, others=()):
    cal = CalibrateLossCoefficients(rule="gradnorm", steps=2)
    tr = trainer(tmp_path, callbacks=[cal, *others])
    cal.setup(tr, module, "fit")


@pytest.mark.parametrize(
    "module_cls, kw, match",
    [
        (NequipConFIG, {}, "manual optimization"),
        (MultitaskLightningModule, {}, "`training_module.aggregator` is ConFIG"),
        (UncertaintyWeightingLightningModule, {}, "computes its own task weights"),
    ],
)
def test_modules_that_do_not_train_the_weighted_sum_are_refused(tmp_path, module_cls, kw, match):
    with pytest.raises(ValueError, match=match):
        _setup_error(tmp_path, module_cls(**module_kwargs(**kw)))


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: SoftAdapt(beta=1.0, interval="epoch", frequency=1), "only one adaptive"),
        (lambda: NequipSoftAdapt(beta=1.0, interval="epoch", frequency=1), "only one adaptive"),
        (
            lambda: LossCoefficientScheduler(schedule={1: {"forces_mse": 2.0}}),
            "cannot be combined",
        ),
    ],
)
def test_other_coefficient_writers_are_refused(tmp_path, other, match):
    with pytest.raises(ValueError, match=match):
        _setup_error(tmp_path, NequIPLightningModule(**module_kwargs()), [other()])


def test_two_calibrations_are_refused(tmp_path):
    # a fixed `state_key` (restarts find the state even after an edit of the rule):
    # Lightning itself refuses a second instance when the Trainer is built
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `Calib"):
        _setup_error(
            tmp_path,
            NequIPLightningModule(**module_kwargs()),
            [CalibrateLossCoefficients(rule="gradnorm", epochs=1)],
        )


def test_module_without_a_loss_manager_is_refused(tmp_path):
    import lightning

    class Plain(lightning.LightningModule):
        pass

    with pytest.raises(
        TypeError, match="CalibrateLossCoefficients needs the training module's `loss`"
    ):
        _setup_error(tmp_path, Plain())


# ---------------------------------------------------------------- nequip-train


def test_real_nequip_train_run(tmp_path):
    """`nequip-train` builds the callback from its `_target_`; nequip's plain module."""
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny_emt.yaml").read_text())
    config["training_module"]["_target_"] = "nequip.train.NequIPLightningModule"
    config["training_module"]["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 0.01}
    config["training_module"].pop("lr_scheduler")
    config["trainer"]["callbacks"].append(
        {
            "_target_": "nequip_mtl.train.callbacks.CalibrateLossCoefficients",
            "rule": "aggregator",
            "epochs": 1,
            "aggregator": UPGRAD,
        }
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "calibrate.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "nequip-train"),
            "-cp",
            str(tmp_path / "cfg"),
            "-cn",
            "calibrate",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["callbacks"]["CalibrateLossCoefficients"]
    chosen = state["coefficients"]
    assert state["start_step"] == 0 and state["end_step"] == 2  # 1 epoch = 2 steps
    assert state["calibration"]["num_steps"] == 2
    assert sorted(chosen) == sorted(ALL) and sum(chosen.values()) == pytest.approx(1.0)
    assert max(abs(c - 1 / 3) for c in chosen.values()) > 0.02  # moved from 1/3 each
    with open(out / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("calibration/coeff/forces_mse")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 2
    for name in ALL:
        assert float(rows[0][f"calibration/coeff/{name}"]) == pytest.approx(chosen[name])


# ---------------------------------------------------------------- DDP


def _ddp_worker(out_dir: str) -> None:
    """One rank (or the single reference process) of the DDP comparison."""
    from lightning.pytorch.strategies import DDPStrategy

    from tests._ddp import end_process_group

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    results = {}
    for name, cls, extra in (
        ("nequip", NequIPLightningModule, {}),
        ("mtl_sum", MultitaskLightningModule, {"aggregator": SUM}),
    ):
        torch.manual_seed(0)
        module = cls(**module_kwargs(loss=loss_config(C0_CONFIG), **extra))
        cal = CalibrateLossCoefficients(rule="aggregator", steps=2, aggregator=UPGRAD)
        tr = trainer(
            out_dir,
            max_epochs=2,
            devices=world,
            strategy=DDPStrategy(process_group_backend="gloo") if world > 1 else "auto",
            callbacks=[cal],
            use_distributed_sampler=True,
        )
        module.world_size = tr.world_size  # as nequip-train does
        # the whole training split is one global batch: per-rank batch 8 / world
        tr.fit(module, datamodule=datamodule(num_frames=10, train=8, val=2, batch_size=8 // world))
        results[name] = {
            "chosen": cal.coefficients,
            "on_module": {n: e.coeff for n, e in module.loss.entries.items()},
        }
    torch.save(results, Path(out_dir) / f"calibrate_world{world}_rank{rank}.pt")
    end_process_group()


@pytest.mark.ddp
def test_ddp_ranks_choose_identical_coefficients(tmp_path):
    """2 gloo ranks (per-rank batch 4) choose bitwise-identical coefficients on both
    ranks, equal to those of 1 process with batch 8."""
    from tests._ddp import launch

    code = "import sys; from tests.test_calibrate import _ddp_worker; _ddp_worker(sys.argv[1])"
    for world in (1, 2):
        launch([sys.executable, "-c", code, str(tmp_path)], world, cwd=REPO)
    one = torch.load(tmp_path / "calibrate_world1_rank0.pt")
    ranks = [torch.load(tmp_path / f"calibrate_world2_rank{r}.pt") for r in (0, 1)]
    for name in ("nequip", "mtl_sum"):
        assert ranks[0][name] == ranks[1][name]  # identical on every rank
        assert ranks[0][name]["on_module"] == ranks[0][name]["chosen"]
        for n in ALL:
            assert ranks[0][name]["chosen"][n] == pytest.approx(one[name]["chosen"][n], rel=1e-9)
