"""Interval callbacks under gradient accumulation (``trainer.accumulate_grad_batches``).

The semantics checked here: ``interval: batch`` means one *optimizer* step. A schedule or a
random draw is applied once, at the first micro-batch of the step's accumulation window,
keyed by ``trainer.global_step``, so every micro-batch of a window is computed with the same
coefficients; SoftAdapt/DWA observe the mean of the window's micro-batch losses once per
optimizer step; the monitor writes one record per optimizer step.

Every run is a real tiny NequIP model in a real Lightning ``Trainer``: 8 training frames in
micro-batches of 2, i.e. 4 micro-batches per epoch, so ``accumulate_grad_batches: 2`` gives
windows of 2+2 and ``3`` gives uneven windows of 3+1 (Lightning steps at the epoch's end).
Expected values are computed here from closed forms and from the losses nequip's
``MetricsManager`` reported, never from our callbacks' own numbers.
"""

from __future__ import annotations

import math
import random

import nequip.train.callbacks as ncb
import pytest
from lightning.pytorch.callbacks import Callback

import nequip_mtl.train.callbacks as mcb
from tests._harness import LOSS_NAMES, MemoryLogger, last_ckpt, nequip_fit
from tests._harness import mtl_loss_config as loss_config

MICRO_BATCHES_PER_EPOCH = 4
THIRD = 1 / 3


class MicroBatchRecorder(Callback):
    """For every micro-batch: the optimizer step it belongs to (``global_step`` when it
    starts), the coefficients its loss was computed with (at ``on_before_backward``) and
    the per-component losses nequip's ``MetricsManager`` reported for it."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict, dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._coeffs = {k: e.coeff for k, e in pl_module.loss.entries.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        losses = dict(pl_module.loss.metrics_values_step)
        self.rows.append((self._step, dict(self._coeffs), losses))

    def windows(self) -> dict[int, list[tuple[dict, dict]]]:
        """``{optimizer step: [(coeffs, losses) of each of its micro-batches]}``."""
        out: dict[int, list[tuple[dict, dict]]] = {}
        for step, coeffs, losses in self.rows:
            out.setdefault(step, []).append((coeffs, losses))
        return out

    def window_coeffs(self) -> dict[int, dict]:
        """The coefficients of each optimizer step, checked to be the same for all of its
        micro-batches."""
        out = {}
        for step, rows in self.windows().items():
            for coeffs, _ in rows:
                assert coeffs == rows[0][0], f"coefficients change inside step {step}"
            out[step] = rows[0][0]
        return out


def window_sizes(acc: int, epochs: int) -> list[int]:
    per_epoch = [acc] * (MICRO_BATCHES_PER_EPOCH // acc)
    if MICRO_BATCHES_PER_EPOCH % acc:
        per_epoch.append(MICRO_BATCHES_PER_EPOCH % acc)
    return per_epoch * epochs


def fit(tmp_path, callbacks, acc: int, epochs: int = 2, **kw):
    rec = MicroBatchRecorder()
    nequip_fit(
        tmp_path,
        [*callbacks, rec],
        max_epochs=epochs,
        batch_size=2,
        accumulate_grad_batches=acc,
        **kw,
    )
    sizes = [len(rows) for _, rows in sorted(rec.windows().items())]
    assert sizes == window_sizes(acc, epochs)
    return rec


def normalise(c: dict) -> dict:
    total = sum(c.values())
    return {k: v / total for k, v in c.items()}


def assert_coeffs(actual: dict, expected: dict, where) -> None:
    assert actual.keys() == expected.keys(), where
    for k, v in expected.items():
        if v is None:
            assert actual[k] is None, (where, k)
        else:
            assert actual[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (where, k)


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("acc", [1, 2, 3])
def test_step_schedule_applies_once_per_optimizer_step(tmp_path, acc):
    """The colleague's reproduction: ``{1: {forces_mse: 2.0}}`` is 0.75 at step 1 and
    stays 0.75 (applying it on both micro-batches gave 0.889). With ``acc: 3`` step 1 is
    the one-micro-batch window that ends epoch 0 and step 2 the 3-micro-batch window that
    starts epoch 1; ``acc: 1`` is the reference without accumulation."""
    sched = mcb.LossCoefficientScheduler(
        {1: {"forces_mse": 2.0}, 2: {"stress_mse": 0.5}}, interval="batch"
    )
    rec = fit(tmp_path, [sched], acc)

    first = {"per_atom_energy_mse": THIRD, "forces_mse": THIRD, "stress_mse": THIRD}
    second = normalise({**first, "forces_mse": 2.0})  # {1/8, 3/4, 1/8}
    third = normalise({**second, "stress_mse": 0.5})  # {1/11, 6/11, 4/11}
    assert second["forces_mse"] == pytest.approx(0.75)
    assert third["stress_mse"] == pytest.approx(4 / 11)
    for step, coeffs in rec.window_coeffs().items():
        expected = first if step < 1 else second if step < 2 else third
        assert_coeffs(coeffs, expected, step)


@pytest.mark.parametrize("acc,shape", [(2, "linear"), (3, "cosine")])
def test_linear_schedule_is_evaluated_at_the_optimizer_step(tmp_path, acc, shape):
    cb = mcb.LinearLossCoefficientScheduler(
        {"forces_mse": 1.0, "per_atom_energy_mse": 0.0, "stress_mse": 0.0},
        interval="batch",
        start_step=1,
        transition_steps=4,
        shape=shape,
    )
    rec = fit(tmp_path, [cb], acc, epochs=3)  # 6 optimizer steps
    coeffs = rec.window_coeffs()
    assert sorted(coeffs) == list(range(6))
    for step, c in coeffs.items():
        frac = min(max((step - 1) / 4, 0.0), 1.0)
        alpha = frac if shape == "linear" else 0.5 * (1 - math.cos(math.pi * frac))
        f = THIRD + alpha * (1 - THIRD)
        assert_coeffs(
            c,
            {"per_atom_energy_mse": (1 - f) / 2, "forces_mse": f, "stress_mse": (1 - f) / 2},
            step,
        )
    assert cb.finished


# ------------------------------------------------------------------ loss-history rules


def _softmax(x: dict, scale: float) -> dict:
    e = {k: math.exp(scale * v) for k, v in x.items()}
    return normalise(e)


def softadapt_paper(beta: float):
    """SoftAdapt with normalised slopes: softmax(beta * s / ||s||_2), s = L(t) - L(t-1)."""

    def rule(prev: dict, new: dict) -> dict:
        s = {k: new[k] - prev[k] for k in new}
        norm = math.sqrt(sum(v * v for v in s.values()))
        return _softmax(s, beta / norm)

    return rule


def dwa_paper(temperature: float):
    """DWA: softmax(r / T), r = L(t) / L(t-1)."""

    def rule(prev: dict, new: dict) -> dict:
        return _softmax({k: new[k] / prev[k] for k in new}, 1 / temperature)

    return rule


def expected_history_coeffs(rec: MicroBatchRecorder, rule, frequency: int) -> dict[int, dict]:
    """Coefficients of every optimizer step, from the losses averaged over each optimizer
    step: one candidate per step from the 2nd on, every ``frequency`` candidates their
    mean becomes the coefficients of the following steps (``scale_by: none``)."""
    windows = sorted(rec.windows().items())
    means = [
        {k: sum(losses[k] for _, losses in rows) / len(rows) for k in LOSS_NAMES}
        for _, rows in windows
    ]
    coeffs = {k: THIRD for k in LOSS_NAMES}
    expected = {windows[0][0]: coeffs}
    cycle: list[dict] = []
    for t in range(1, len(windows)):
        # observed after step t-1 ... and step t-2's loss is the previous observation
        if t >= 2:
            cycle.append(rule(means[t - 2], means[t - 1]))
            if len(cycle) == frequency:
                coeffs = {k: sum(c[k] for c in cycle) / frequency for k in LOSS_NAMES}
                cycle = []
        expected[windows[t][0]] = coeffs
    return expected


HISTORY_CASES = {
    "softadapt_acc2_f1": (
        lambda: mcb.SoftAdapt(beta=1.1, interval="batch", frequency=1, scale_by="none"),
        softadapt_paper(1.1),
        1,
        2,
    ),
    "softadapt_acc3_f2": (
        lambda: mcb.SoftAdapt(beta=2.0, interval="batch", frequency=2, scale_by="none"),
        softadapt_paper(2.0),
        2,
        3,
    ),
    "dwa_acc2_f1": (
        lambda: mcb.DynamicWeightAverage(
            temperature=0.05, interval="batch", frequency=1, scale_by="none"
        ),
        dwa_paper(0.05),
        1,
        2,
    ),
    "dwa_acc3_f2": (
        lambda: mcb.DynamicWeightAverage(
            temperature=0.05, interval="batch", frequency=2, scale_by="none"
        ),
        dwa_paper(0.05),
        2,
        3,
    ),
}


@pytest.mark.parametrize("case", list(HISTORY_CASES))
def test_history_rules_observe_the_optimizer_step_mean_loss(tmp_path, case):
    make, rule, frequency, acc = HISTORY_CASES[case]
    rec = fit(tmp_path, [make()], acc, epochs=4)  # 8 optimizer steps
    actual = rec.window_coeffs()  # also: constant within each window
    expected = expected_history_coeffs(rec, rule, frequency)
    assert sorted(actual) == sorted(expected) == list(range(8))
    for step in expected:
        assert_coeffs(actual[step], expected[step], step)
    assert len({tuple(c.values()) for c in actual.values()}) >= 1 + 6 // frequency


def test_nequip_softadapt_updates_inside_an_accumulation_window(tmp_path):
    """nequip's ``SoftAdapt(interval: batch)`` acts on every micro-batch with
    ``global_step % frequency == 1``: the coefficients change between the micro-batches of
    one optimizer step (the deliberate difference to ours, documented in docs/callbacks.md)."""
    rec = fit(
        tmp_path,
        [ncb.SoftAdapt(beta=1.1, interval="batch", frequency=2)],
        acc=2,
        module_kw={"loss": loss_config(target="nequip.train.EnergyForceStressLoss")},
    )
    window = rec.windows()[1]
    assert window[0][0] != window[1][0]


# ------------------------------------------------------------------ random weighting


@pytest.mark.parametrize("acc,frequency", [(2, 1), (3, 2)])
def test_rlw_draws_once_per_optimizer_step(tmp_path, acc, frequency):
    rec = fit(
        tmp_path,
        [mcb.RandomLossWeighting(frequency=frequency, std=1.0, seed=11, scale_by="none")],
        acc,
        epochs=3,
    )
    rng = random.Random(11)
    coeffs = None
    for step, actual in sorted(rec.window_coeffs().items()):
        if step % frequency == 0:  # the paper: softmax(z), z ~ N(0, 1), one draw per step
            coeffs = _softmax({k: rng.gauss(0.0, 1.0) for k in LOSS_NAMES}, 1.0)
        assert_coeffs(actual, coeffs, step)


# ------------------------------------------------------------------ monitor


class NequipMonitorSteps(ncb.LossCoefficientMonitor):
    """nequip's monitor, recording the global step of each of its logging calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def _log_coefficients(self, pl_module) -> None:
        self.steps.append(pl_module.trainer.global_step)
        super()._log_coefficients(pl_module)


@pytest.mark.parametrize("acc,frequency", [(2, 1), (3, 2)])
def test_monitor_logs_once_per_optimizer_step(tmp_path, acc, frequency):
    memory = MemoryLogger()
    theirs = NequipMonitorSteps(interval="batch", frequency=frequency)
    sched = mcb.LossCoefficientScheduler(
        {1: {"forces_mse": 2.0}, 2: {"stress_mse": 3.0}}, interval="batch"
    )
    rec = fit(
        tmp_path,
        [sched, mcb.LossCoefficientMonitor(interval="batch", frequency=frequency), theirs],
        acc,
        logger=[memory],
    )
    coeffs = rec.window_coeffs()  # 4 optimizer steps
    logged = memory.values("loss_coeff/forces_mse")
    # one record after every `frequency`-th optimizer step, with that step's coefficients
    assert [s for s, _ in logged] == list(range(frequency, 5, frequency))
    for step, value in logged:
        assert value == pytest.approx(coeffs[step - 1]["forces_mse"], rel=1e-12)
    # nequip's fires on every micro-batch whose global_step matches, also on the first
    # micro-batches of the next window: duplicates
    assert len(theirs.steps) > len(set(theirs.steps))


# ------------------------------------------------------------------ exact resume


RESUME_CASES = {
    "step_schedule": lambda: [
        mcb.LossCoefficientScheduler(
            {1: {"forces_mse": 2.0}, 4: {"stress_mse": 3.0}}, interval="batch"
        )
    ],
    "linear": lambda: [
        mcb.LinearLossCoefficientScheduler(
            {"forces_mse": 3.0}, interval="batch", start_step=2, transition_steps=5
        )
    ],
    "softadapt": lambda: [mcb.SoftAdapt(beta=1.1, interval="batch", frequency=2)],
    "dwa": lambda: [mcb.DynamicWeightAverage(interval="batch", frequency=1)],
    "rlw": lambda: [mcb.RandomLossWeighting(seed=3, frequency=1)],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_at_an_epoch_boundary_with_accumulation(tmp_path, case):
    """A checkpoint saved at the end of epoch 2 (an optimizer-step boundary; windows of
    3+1 micro-batches, so after step 3) resumes to exactly the uninterrupted run's
    coefficients, including an action due at step 4, the first one after the cut."""
    full = fit(tmp_path / "full", RESUME_CASES[case](), acc=3, epochs=4)
    first = fit(tmp_path / "cut", RESUME_CASES[case](), acc=3, epochs=2, checkpoint=True)
    rec = MicroBatchRecorder()
    nequip_fit(
        tmp_path / "cut",
        [*RESUME_CASES[case](), rec],
        max_epochs=4,
        batch_size=2,
        accumulate_grad_batches=3,
        ckpt_path=last_ckpt(tmp_path / "cut"),
    )
    coeffs = full.window_coeffs()
    assert len({tuple(c.values()) for c in coeffs.values()}) > 2  # they really move
    assert [r[:2] for r in first.rows + rec.rows] == [r[:2] for r in full.rows]
