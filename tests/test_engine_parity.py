"""Training runs of the gradient-aggregation modules, step by step, against a
plain-autograd implementation of the same update computed in the same process.

Each run fits a real module (3 epochs x 2 optimizer steps of a tiny NequIP model) and
records, per optimizer step, its micro-batches, the parameters before it, the update it
applied (``.grad``) and the parameters after it. A replay then steps a copy of the initial
model on those batches without Lightning and without the step engine: per-task losses
from the loss ``MetricsManager``, per-task gradients with ``torch.autograd.grad``, the
aggregator of ``nequip_mtl.aggregators`` applied to the gradient matrix (its math is
tested in ``tests/unit``), the update written to ``.grad``, its own optimizer of the same
kind. The documented semantics are written out in the replay, not taken from the module:
the coefficients of each epoch (from the schedule, normalised as nequip does),
accumulation (per-task gradients averaged over the window's micro-batches, aggregated
once), ``weights_every`` (a refresh every k-th step or on a change of the coefficients,
the loss ``sum_i w_i L_i`` with the held weights in between), MomentumConFIG's round
robin, FAMO's weights and logit rule. The replay's state (optimizer moments, momenta,
held weights, FAMO logits) evolves on its own; its parameters are set to the module's
before every step, so that rounding differences do not compound along the run and every
step is compared with a bound of its own (``combination_bound``, ``Replay.step``): the
two computations differ only in rounding (the update as ``torch.mv`` of the rows or as
``w @ G``, ``.grad`` scaled by ``1/accumulate`` and accumulated in place or summed and
divided, ...), whatever the CPU.

Runs: ConFIG in float64 (Adam) and float32 (SGD); UPGrad with ``weights_every: 4`` and
``accumulate_grad_batches: 2`` (SGD: Adam is invariant to a global scale of the gradient,
so a wrong ``1/accumulate`` factor would hardly show); MomentumConFIG with Adam (without
its second moment, as its docs advise with Adam: the engine's part, the round robin and
``aggregate_subset``, is the same either way, and the second moment's math is tested in
``tests/test_momentum_config.py``); ConFIG under nequip's ``LossCoefficientScheduler`` (a
change of coefficients, then of the active set); FAMO (Adam). DDP: the two DDP runs this
file had (ConFIG, and UPGrad with ``weights_every: 2``, ``SimpleDDPStrategy``, 8 frames, 3
epochs) are ``config`` and ``upgrad_weights_every`` of
``tests/test_ddp.py::test_two_ranks_match_one_process``, which compares them (also with
Lightning's ``DDPStrategy``), in the same run, with one process on the same global
batches; the one-process update of those modules is what this file checks.

Checked to fail (then reverted): with ``HeldWeights.valid_for`` returning ``False`` (a
refresh on every step) ``upgrad_every4_accumulate2`` fails at step 1 (an update entry
-7.8e-4 against the replay's -7.7e-2); with the ``1/accumulate`` factor dropped in
``StepEngine.begin`` (``factor = scale``) it fails at step 0 (twice the replay's update);
with ``StepEngine.finish`` passing ``computed = list(range(len(tasks)))`` to
``aggregate_subset`` ``momentum_config`` fails at step 1; with FAMO's logit update fed the
losses in the wrong order ``famo`` fails at step 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nequip_mtl.aggregators import ConFIG, MomentumConFIG, UPGrad
from nequip_mtl.weighting.famo import FAMOLogits
from tests._harness import datamodule, fit, params

ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}
NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
EQUAL = {n: 1.0 for n in NAMES}

#: the loss coefficients of each epoch of ``config_scheduled``: nequip's
#: LossCoefficientScheduler sets them at the start of the epoch with ``set_coeffs``, which
#: normalises them to sum 1 and switches every unnamed term off (``None``)
SCHEDULE = {
    1: {"per_atom_energy_mse": 1.0, "forces_mse": 4.0, "stress_mse": 1.0},
    2: {"per_atom_energy_mse": 1.0, "forces_mse": 4.0},
}

RUNS = {
    "config_float64": dict(
        module="nequip_mtl.train.ConFIGLightningModule", optimizer=ADAM, reference=ConFIG
    ),
    "config_float32": dict(
        module="nequip_mtl.train.ConFIGLightningModule", dtype="float32", reference=ConFIG
    ),
    "upgrad_every4_accumulate2": dict(
        module="nequip_mtl.train.MultitaskLightningModule",
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        weights_every=4,
        accumulate=2,
        batch_size=2,
        reference=UPGrad,
    ),
    "momentum_config": dict(
        module="nequip_mtl.train.MultitaskLightningModule",
        aggregator={"_target_": "nequip_mtl.aggregators.MomentumConFIG", "second_moment": False},
        optimizer=ADAM,
        reference=MomentumConFIG,
        reference_kwargs={"second_moment": False},
    ),
    "config_scheduled": dict(
        module="nequip_mtl.train.ConFIGLightningModule",
        callbacks=[
            {"_target_": "nequip.train.callbacks.LossCoefficientScheduler", "schedule": SCHEDULE}
        ],
        reference=ConFIG,
    ),
    "famo": dict(module="nequip_mtl.train.FAMOLightningModule", optimizer=ADAM, reference="famo"),
}


class Recorder(Callback):
    """The initial model and loss; per optimizer step: its epoch and micro-batches (copies,
    taken before the module sees them), the parameters before it, the update it applied
    (``.grad`` as the optimizer sees it) and the parameters after it."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, list]] = []
        self.before: list[torch.Tensor] = []
        self.updates: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module.model)
        self.loss = copy.deepcopy(pl_module.loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.windows.append((trainer.current_epoch, []))
            self.before.append(params(pl_module))
        self.windows[-1][1].append(copy.deepcopy(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.model.parameters()]
        assert all(g is not None for g in grads)  # every parameter is reached here
        self.updates.append(torch.cat([g.flatten().double() for g in grads]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:  # this micro-batch ended with the step
            self.after.append(params(pl_module))


def coeffs_of_epoch(name: str, epoch: int) -> dict[str, float]:
    """The active loss coefficients of an epoch of run ``name``, normalised to sum 1."""
    raw = EQUAL
    if name == "config_scheduled":
        for start in sorted(SCHEDULE):
            if epoch >= start:
                raw = SCHEDULE[start]
    total = sum(raw.values())
    return {n: raw[n] / total for n in NAMES if n in raw}


# ---------------------------------------------------------------- rounding bounds
#
# The module and the replay compute the same quantities by different operations (the
# update as `torch.mv` of the task-gradient rows or as `w @ G`; micro-batch gradients
# scaled by 1/k and accumulated in place, or summed and divided; the Gram matrix of a view
# or of a fresh tensor), so on some CPU they may round differently. `u` is the unit
# roundoff of the model's dtype, N the number of parameters, m the tasks, k the
# micro-batches per step. First-order bounds, per parameter entry:
#
# - a sum of n terms computed in two orders differs by at most n u sum|terms|;
# - a Gram entry g_i.g_j (N terms) by N u |g_i||g_j|: the cosine matrix K by N u in each
#   entry, by m N u in norm; the solve for the weights (ConFIG, UPGrad: both work on K)
#   moves them by kappa(K) times that relative to their norm, and the normalisation of
#   the result as much again (factor 2); the weights' error enters the update as
#   sum_i dw_i g_i <= 2 kappa m N u sqrt(m) max_i(|w_i||g_i|) sum_i |g_ik| / |g_i|;
# - errors of the rows themselves (accumulation) enter through the weights directly and,
#   relative to the rows' norms, through K.


def combination_bound(rows, w, err_rows, u, solve: bool) -> torch.Tensor:
    """Bound on the difference of ``sum_i w_i rows_i`` between two computations whose rows
    differ by at most ``err_rows`` (per entry) and whose weights come from the cosine
    matrix of the rows (``solve``) or are exact (``solve=False``)."""
    rows, w = rows.double(), w.double()
    m, n = rows.shape
    terms = w.abs()[:, None] * rows.abs()
    bound = (w.abs()[:, None] * err_rows).sum(0) + m * u * terms.sum(0)
    if solve and m > 1:
        norms = rows.norm(dim=1)
        cos = (rows @ rows.T) / (norms[:, None] * norms[None, :])
        rel = n * u + 2 * float((err_rows.norm(dim=1) / norms).max())
        kappa = float(torch.linalg.cond(cos))
        scale = float((w.abs() * norms).max())
        bound += 2 * kappa * m * rel * m**0.5 * scale * (rows.abs() / norms[:, None]).sum(0)
    return bound


class Replay:
    """The recorded initial model and loss, stepped by hand: before each step the
    parameters are set to the module's (so that rounding differences do not compound
    through the trajectory and each step can be compared with its own bound)."""

    def __init__(self, rec: Recorder, optimizer: dict):
        self.model = copy.deepcopy(rec.model)["sole_model"]
        self.loss = copy.deepcopy(rec.loss)
        self.params = list(self.model.parameters())
        self.u = torch.finfo(self.params[0].dtype).eps / 2
        opt = dict(optimizer)
        cls = {"torch.optim.Adam": torch.optim.Adam, "torch.optim.SGD": torch.optim.SGD}
        self.optimizer = cls[opt.pop("_target_")](self.params, **opt)
        self.lr = opt["lr"]
        #: Adam's state mixes the updates of all steps so far: their largest error counts
        self.adam = isinstance(self.optimizer, torch.optim.Adam)
        self._history_bound = None

    def load(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """The raw (unweighted) loss components of one micro-batch."""
        batch = copy.deepcopy(batch)
        with torch.enable_grad():
            out = self.model(copy.copy(batch))
        return self.loss(out, batch)

    def grad(self, loss: torch.Tensor, retain: bool = False) -> torch.Tensor:
        g = torch.autograd.grad(loss, self.params, retain_graph=retain)
        return torch.cat([x.flatten() for x in g])

    def step(self, update: torch.Tensor, update_bound: torch.Tensor):
        """Apply ``update`` as ``.grad`` with the optimizer; return the parameters after the
        step and the bound on their difference from a step whose update differs by at most
        ``update_bound``.

        SGD moves each entry by ``lr * g``. Adam moves it by ``lr * mhat / (s + eps)``:
        ``mhat`` and ``s = sqrt(vhat)`` are weighted means (weights summing to 1) of the
        gradients and of their squares, so a change of at most ``d`` in every gradient so
        far changes either by at most ``d``, the step by at most
        ``lr d (1 / (s + eps) + |mhat| / (s + eps)^2)``. Either way the optimizer's own
        formula may round the other way: a few ulps of the parameter and of its change.
        """
        before = torch.cat([p.detach().flatten().double() for p in self.params])
        offset = 0
        for p in self.params:
            p.grad = update[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        after = torch.cat([p.detach().flatten().double() for p in self.params])
        if self.adam:
            d = update_bound
            if self._history_bound is not None:
                d = torch.maximum(d, self._history_bound)
            self._history_bound = d
            (group,) = self.optimizer.param_groups
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            mhat, s = [], []
            for p in self.params:
                state = self.optimizer.state[p]
                t = float(state["step"])
                mhat.append((state["exp_avg"] / (1 - beta1**t)).flatten().double())
                s.append((state["exp_avg_sq"] / (1 - beta2**t)).sqrt().flatten().double())
            mhat, s = torch.cat(mhat), torch.cat(s)
            moved = self.lr * d * (1 / (s + eps) + mhat.abs() / (s + eps) ** 2)
        else:
            moved = self.lr * update_bound
        return after, moved + 4 * self.u * (after.abs() + (after - before).abs())


def task_rows(run: Replay, window, names, tasks):
    """The per-task gradients of a window (mean over its micro-batches), the mean of their
    absolute values (what the rounding of the accumulation is relative to), and the losses
    of every micro-batch."""
    rows, mags, losses = 0, 0, []
    for batch in window:
        batch_losses = run.losses(batch)
        losses.append(batch_losses)
        g = torch.stack([run.grad(batch_losses[names[j]], retain=True) for j in tasks])
        rows, mags = rows + g, mags + g.abs().double()
    return rows / len(window), mags / len(window), losses


def replay_aggregation(name: str, rec: Recorder, spec: dict):
    """Per-task gradients of each window (mean over its micro-batches), aggregated once;
    with ``weights_every: k``, the weights of a refresh reused on the next k - 1 steps
    unless the coefficients change."""
    run = Replay(rec, spec.get("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.01}))
    aggregator = spec["reference"](**spec.get("reference_kwargs", {}))
    every = spec.get("weights_every", 1)
    u = run.u
    momenta_err = None
    held, last_names, out = None, None, []
    for (epoch, window), before in zip(rec.windows, rec.before):
        run.load(before)
        k = len(window)
        coeffs = coeffs_of_epoch(name, epoch)
        names = list(coeffs)
        if last_names is not None and names != last_names:
            aggregator.reset()
        last_names = names
        c = torch.tensor([coeffs[n] for n in names], dtype=torch.float64)
        every_task = list(range(len(names)))
        if held is not None and held["coeffs"] == coeffs and held["since"] < every:
            # between refreshes: one loss, the held weights times the task losses
            w = torch.tensor(held["weights"], dtype=torch.float64)
            update = 0
            for batch in window:
                losses = run.losses(batch)
                update = update + run.grad(sum(wi * losses[n] for n, wi in zip(names, w)))
            update = update / k
            held["since"] += 1
            # the bound: the m-term weighted sum in the backward pass, the k micro-batches
            # accumulated, the 1/k scaling (per-task gradients computed for it only)
            _, mags, _ = task_rows(run, window, names, every_task)
            bound = (len(names) + k + 1) * u * (w.abs()[:, None] * mags).sum(0)
        else:
            tasks = every_task
            if isinstance(aggregator, MomentumConFIG):
                tasks = aggregator.select_tasks(len(names))
            rows, mags, _ = task_rows(run, window, names, tasks)
            assert bool((rows.norm(dim=1) > 0).all())  # no task is dropped on these batches
            err = (k + 1) * u * mags  # k micro-batches accumulated, scaled by 1/k
            if isinstance(aggregator, MomentumConFIG):
                update = aggregator.aggregate_subset(rows, c.to(rows.dtype), tasks)
                bound, momenta_err = momentum_bound(aggregator, c, tasks, err, u, momenta_err)
            else:
                w = aggregator.weights(rows.double() @ rows.double().T, c, source_dtype=rows.dtype)
                if every > 1:
                    update = w.to(rows.dtype) @ rows
                    held = {"coeffs": coeffs, "weights": w.tolist(), "since": 1}
                else:
                    update = aggregator(rows, c.to(rows.dtype))
                bound = combination_bound(rows, w, err, u, solve=True)
        out.append((update.double(), bound, *run.step(update, bound)))
    return out


def momentum_bound(aggregator, c, tasks, err_rows, u, momenta_err):
    """The bound for MomentumConFIG without its second moment: ConFIG of the
    bias-corrected momenta (exponential means of each task's gradients: a momentum differs
    by at most the largest difference of the gradients it averages)."""
    state = aggregator.state_dict()
    momenta, counts = state["momenta"].double(), state["counts"]
    m = len(counts)
    if momenta_err is None:
        momenta_err = torch.zeros_like(momenta)
    for row, task in enumerate(tasks):
        momenta_err[task] = torch.maximum(momenta_err[task], err_rows[row])
    seen = [i for i in range(m) if counts[i] > 0]
    corr = torch.tensor([1 / (1 - aggregator.beta_1 ** counts[i]) for i in seen])
    rows = momenta[seen] * corr[:, None]
    err = momenta_err[seen] * corr[:, None]
    if len(seen) == 1:
        return err[0] + u * rows[0].abs(), momenta_err
    w = ConFIG().weights(rows @ rows.T, c[seen])
    return combination_bound(rows, w, err, u, solve=True), momenta_err


def replay_famo(rec: Recorder, spec: dict):
    """FAMO: train on ``sum_k w_k L_k`` with FAMO's weights of the step's losses; before
    each step after the first, one logit update from the previous step's losses to this
    step's (equal coefficients: the logits start at 0)."""
    run = Replay(rec, spec["optimizer"])
    logits = FAMOLogits(len(NAMES), lr=0.025, weight_decay=1e-3)
    out, prev = [], None
    for (_, window), before in zip(rec.windows, rec.before):
        run.load(before)
        (batch,) = window
        losses = run.losses(batch)
        values = torch.stack([losses[n].detach() for n in NAMES]).double()
        if prev is not None:
            logits.update(prev, values)
        w = logits.weights(values)
        rows = torch.stack([run.grad(losses[n], retain=True) for n in NAMES])
        update = run.grad(sum(float(w[i]) * losses[n] for i, n in enumerate(NAMES)))
        bound = combination_bound(rows, w, torch.zeros_like(rows.double()), run.u, solve=False)
        out.append((update.double(), bound, *run.step(update, bound)))
        prev = values
    return out


def run(name: str, tmp_path) -> Recorder:
    from hydra.utils import get_class, instantiate

    spec = dict(RUNS[name])
    module = spec.pop("module")
    for key in ("reference", "reference_kwargs"):
        spec.pop(key, None)
    callbacks = [instantiate(c) for c in spec.pop("callbacks", [])]
    rec = Recorder()
    accumulate = spec.pop("accumulate", 1)
    batch_size = spec.pop("batch_size", 4)
    fit(
        get_class(module),
        tmp_path,
        max_epochs=3,
        data=datamodule(batch_size=batch_size),
        trainer_kwargs={"callbacks": [*callbacks, rec], "accumulate_grad_batches": accumulate},
        **spec,
    )
    return rec


@pytest.mark.parametrize("name", list(RUNS))
def test_trajectory_matches_a_plain_autograd_replay(name, tmp_path):
    spec = RUNS[name]
    rec = run(name, tmp_path)
    assert len(rec.after) == len(rec.updates) == 6  # 3 epochs x 2 optimizer steps
    if spec["reference"] == "famo":
        want = replay_famo(rec, spec)
    else:
        want = replay_aggregation(name, rec, spec)
    for step, (update, bound, after, moved) in enumerate(want):
        _within(rec.updates[step], update, bound, f"{name}: the update of step {step}")
        _within(rec.after[step], after, moved, f"{name}: the parameters after step {step}")
        # the comparison means something: every step moves the parameters by far more
        assert float((after - rec.before[step]).abs().max()) > 10 * float(moved.max())


def _within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    excess = (got - want).abs() / bound
    worst = int(excess.argmax())
    assert float(excess[worst]) <= 1.0, (
        f"{what}: entry {worst} is {float(got[worst])!r}, the replay's {float(want[worst])!r}; "
        f"difference {float((got - want).abs()[worst]):.3g} > bound {float(bound[worst]):.3g}"
    )
