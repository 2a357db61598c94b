"""MomentumConFIG: closed forms, state, and one backward pass per step in real training."""

import copy
import io

import lightning
import pytest
import torch

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG, MomentumConFIG
from tests._harness import fit


def _grads(m=3, n=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, m, dtype=dtype)
    return torch.randn(m, n, generator=g, dtype=dtype) * scales[:, None]


def test_without_momentum_it_is_config():
    """beta_1 = 0, no second moment, all tasks every step: exactly ConFIG."""
    agg = MomentumConFIG(beta_1=0.0, second_moment=False, tasks_per_step=3)
    coeffs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for seed in range(3):
        G = _grads(seed=seed)
        torch.testing.assert_close(agg(G, coeffs), ConFIG()(G, coeffs), rtol=1e-12, atol=0)


def test_first_step_moves_along_the_one_task_seen():
    """The reference implementation returns zeros until every task was seen; ours does not."""
    agg = MomentumConFIG(beta_1=0.9, second_moment=False)
    G = _grads()
    assert agg.select_tasks(3) == [0]
    u = agg.aggregate_subset(G[:1], torch.full((3,), 1 / 3, dtype=torch.float64), [0])
    # bias correction: m_hat = (1 - b) g / (1 - b) = g
    torch.testing.assert_close(u, G[0], rtol=1e-12, atol=0)


def test_momenta_are_bias_corrected_per_task():
    agg = MomentumConFIG(beta_1=0.5, second_moment=False)
    coeffs = torch.full((2,), 0.5, dtype=torch.float64)
    g1, g2, h1 = _grads(m=3, seed=1)
    agg.aggregate_subset(g1[None], coeffs, [0])
    agg.aggregate_subset(h1[None], coeffs, [1])
    u = agg.aggregate_subset(g2[None], coeffs, [0])
    # task 0: m = 0.25 g1 + 0.5 g2 (two updates) / (1 - 0.25); task 1: h1
    m0 = (0.25 * g1 + 0.5 * g2) / 0.75
    expected = ConFIG()(torch.stack([m0, h1]), coeffs)
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=0)


def test_second_moment_closed_form():
    """A constant update u with beta_1 = 0: s_hat = u^2, so the output is u / (|u| + eps)."""
    agg = MomentumConFIG(beta_1=0.0, beta_2=0.9, eps=1e-8)
    g = _grads(m=1)[0]
    for _ in range(5):
        out = agg.aggregate_subset(g[None], torch.ones(1, dtype=torch.float64), [0])
        torch.testing.assert_close(out, g / (g.abs() + 1e-8), rtol=1e-10, atol=0)


def _paper_config(rows: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """ConFIG from its formula (unit rows, least squares, sum of projections), float64."""
    units = rows / rows.norm(dim=1, keepdim=True)
    x = torch.linalg.pinv(units) @ (coeffs / coeffs.norm())
    x = x / x.norm()
    return (rows @ x).sum() * x


class PaperPseudoMomentum:
    """M-ConFIG's pseudo-momentum operator written from the paper (arXiv 2408.11104,
    Algorithm 2; `PseudoMomentumOperator` of the authors' `conflictfree` package):

    m_i <- b1 m_i + (1 - b1) g_i for the tasks back-propagated at this step,
    g_c = ConFIG(m_i / (1 - b1^t_i)),  t = step count,
    p_t = g_c (1 - b1^t),  g_pseudo = (p_t - b1 p_{t-1}) / (1 - b1),
    s <- b2 s + (1 - b2) g_pseudo^2,  update = g_c / (sqrt(s / (1 - b2^t)) + eps).

    Where the paper returns zeros until every task was seen, tasks not seen yet are left
    out of the ConFIG step (our documented deviation); with every task back-propagated on
    every step the two are the same.
    """

    def __init__(self, m, n, b1, b2, eps=1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = torch.zeros(m, n, dtype=torch.float64)
        self.t_i = [0] * m
        self.t = 0
        self.s = torch.zeros(n, dtype=torch.float64)
        self.p = torch.zeros(n, dtype=torch.float64)

    def step(self, grads, tasks, coeffs):
        for row, i in enumerate(tasks):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * grads[row]
            self.t_i[i] += 1
        seen = [i for i, t in enumerate(self.t_i) if t > 0]
        m_hat = torch.stack([self.m[i] / (1 - self.b1 ** self.t_i[i]) for i in seen])
        g_c = m_hat[0] if len(seen) == 1 else _paper_config(m_hat, coeffs[seen])
        self.t += 1
        p = g_c * (1 - self.b1**self.t)
        pseudo = (p - self.b1 * self.p) / (1 - self.b1)
        self.p = p
        self.s = self.b2 * self.s + (1 - self.b2) * pseudo**2
        return g_c / ((self.s / (1 - self.b2**self.t)).sqrt() + self.eps)


@pytest.mark.parametrize("tasks_per_step", [1, 2, 3])
def test_second_moment_matches_the_papers_operator(tasks_per_step):
    """beta_1 > 0 and the second moment, against the operator written from the paper."""
    b1, b2 = 0.9, 0.99
    coeffs = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    agg = MomentumConFIG(beta_1=b1, beta_2=b2, tasks_per_step=tasks_per_step)
    ref = PaperPseudoMomentum(3, 40, b1, b2)
    for step in range(9):
        G = _grads(seed=step)
        sel = agg.select_tasks(3)
        assert sel == sorted({(step * tasks_per_step + j) % 3 for j in range(tasks_per_step)})
        u = agg.aggregate_subset(G[sel], coeffs, sel)
        torch.testing.assert_close(u, ref.step(G[sel], sel, coeffs), rtol=1e-9, atol=0)


def _run(agg, steps, m=3, first=0, coeffs=None, dtype=torch.float64):
    """Drive `agg` as the training module does: select_tasks, then aggregate_subset."""
    coeffs = torch.full((m,), 1 / m, dtype=dtype) if coeffs is None else coeffs
    tasks, updates = [], []
    for seed in range(first, first + steps):
        G = _grads(m=m, seed=seed).to(dtype)
        sel = agg.select_tasks(m)
        tasks.append(sel)
        updates.append(agg.aggregate_subset(G[sel], coeffs, sel))
    return tasks, updates


ROUND_ROBIN = {
    1: [[0], [1], [2], [0], [1], [2], [0]],
    2: [[0, 1], [0, 2], [1, 2], [0, 1], [0, 2], [1, 2], [0, 1]],  # {0,1}, {2,0}, {1,2}, ...
}


@pytest.mark.parametrize("k", [1, 2])
def test_round_robin_selection_alone(k):
    agg = MomentumConFIG(tasks_per_step=k)
    assert [agg.select_tasks(3) for _ in range(7)] == ROUND_ROBIN[k]


@pytest.mark.parametrize("second_moment", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_round_robin_as_the_training_module_calls_it(k, second_moment):
    """select_tasks then aggregate_subset on every step; the first step's lazy allocation
    (and the one after a change of the active set, signalled by `reset()`) must not move
    the round-robin position: 0, 1, 2, 0, ... from the first step."""
    agg = MomentumConFIG(tasks_per_step=k, second_moment=second_moment)
    assert _run(agg, 7)[0] == ROUND_ROBIN[k]
    agg.reset()  # the module's signal that the set of active tasks changed
    assert _run(agg, 7)[0] == ROUND_ROBIN[k]
    # a different number of active tasks without reset(): restart the cycle over 2 tasks
    tasks, _ = _run(agg, 4, m=2)
    assert tasks == ([[0], [1], [0], [1]] if k == 1 else [[0, 1]] * 4)


def _save_and_load(agg):
    """A checkpoint round trip through bytes, as Lightning does, into a fresh aggregator."""
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    buffer.seek(0)
    fresh = MomentumConFIG(**_KWARGS)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


_KWARGS = dict(beta_1=0.9, beta_2=0.99, tasks_per_step=1)


@pytest.mark.parametrize("k", [1, 2, 4, 5])  # 3 tasks: k not a multiple of m, and k = 4
def test_restart_continues_exactly_like_an_uninterrupted_run(k):
    straight = MomentumConFIG(**_KWARGS)
    tasks, updates = _run(straight, 8)
    interrupted = MomentumConFIG(**_KWARGS)
    tasks_a, updates_a = _run(interrupted, k)
    restored = _save_and_load(interrupted)
    # every piece of state survives: all private attributes equal
    for name, value in vars(interrupted).items():
        if name == "_config":
            continue
        other = vars(restored)[name]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=0, atol=0)
        else:
            assert other == value, name
    tasks_b, updates_b = _run(restored, 8 - k, first=k)
    assert tasks_a + tasks_b == tasks == ROUND_ROBIN[1] + [[1]]
    for u, v in zip(updates_a + updates_b, updates):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_loaded_state_is_a_copy():
    a = MomentumConFIG(**_KWARGS)
    _run(a, 2)
    b = MomentumConFIG(**_KWARGS)
    b.load_state_dict(a.state_dict())
    before = a.state_dict()["momenta"].clone()
    _run(b, 2, first=2)
    torch.testing.assert_close(a.state_dict()["momenta"], before, rtol=0, atol=0)


def test_restored_state_moves_to_the_gradients_dtype():
    """A float64 checkpoint resumed with float32 gradients (same path as rank 0's cuda:0
    tensors loaded on a CPU or another GPU): the state follows the gradients lazily."""
    a = MomentumConFIG(**_KWARGS)
    _run(a, 4)
    b = _save_and_load(a)
    assert b._momenta.dtype == torch.float64
    _, updates = _run(b, 3, first=4, dtype=torch.float32)
    assert all(u.dtype == torch.float32 for u in updates)
    for t in (b._momenta, b._second, b._prev_pseudo):
        assert t.dtype == torch.float32
    # and it continued from the restored state: close to the float64 continuation
    _, expected = _run(a, 3, first=4)
    for u, v in zip(updates, expected):
        torch.testing.assert_close(u.double(), v, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restored_cuda_state_moves_to_cpu_gradients_and_back():
    a = MomentumConFIG(**_KWARGS)
    _run(a, 4)
    expected = _run(copy.deepcopy(a), 3, first=4)[1]
    state = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()}
    b = MomentumConFIG(**_KWARGS)
    b.load_state_dict(state)
    got = _run(b, 3, first=4)[1]
    assert b._momenta.device.type == "cpu" and b._second.device.type == "cpu"
    for u, v in zip(got, expected):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)
    # CPU state, CUDA gradients
    c = MomentumConFIG(**_KWARGS)
    c.load_state_dict(a.state_dict())
    coeffs = torch.full((3,), 1 / 3, dtype=torch.float64, device="cuda")
    G = _grads(seed=4).cuda()
    sel = c.select_tasks(3)
    u = c.aggregate_subset(G[sel], coeffs, sel)
    assert u.device.type == "cuda" and c._momenta.device.type == "cuda"
    torch.testing.assert_close(u.cpu(), expected[0], rtol=1e-10, atol=0)


def test_load_state_dict_validation():
    with pytest.raises(ValueError, match="expects the keys"):
        MomentumConFIG().load_state_dict({"next": 1})
    state = MomentumConFIG().state_dict()
    state.update(momenta=torch.zeros(2, 5), counts=[1, 1, 1])
    with pytest.raises(ValueError, match="does not match 3 task counts"):
        MomentumConFIG().load_state_dict(state)


@pytest.mark.parametrize("scale", [2.0**-40, 2.0**-10, 3.0, 2.0**40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_homogeneity(scale, dtype):
    """Without the second moment the update is linear in the gradients (degree 1); with it,
    scale-free (degree 0, up to `eps`), along the same history of gradients. The absolute
    floors `eps` and `norm_eps` (nequip's ConFIG floor) are set below every norm here.

    float64: the scaled run against the plain one, to 1e-12. float32: the scaled float32
    run against the exact answer, the float64 run on the same (float32) gradients times
    the scale, within a bound of float32's rounding (:class:`_Float32Bound`)."""
    coeffs = torch.full((3,), 1 / 3, dtype=dtype)
    for second_moment in (False, True):
        kwargs = dict(beta_1=0.9, second_moment=second_moment, eps=1e-30, norm_eps=1e-30)
        plain, scaled = MomentumConFIG(**kwargs), MomentumConFIG(**kwargs)
        bound = _Float32Bound(kwargs)
        degree = 0 if second_moment else 1
        for seed in range(5):
            G = _grads(seed=seed, dtype=dtype)
            sel = plain.select_tasks(3)
            assert scaled.select_tasks(3) == sel
            u_s = scaled.aggregate_subset(G[sel] * scale, coeffs, sel)
            if dtype == torch.float64:
                u = plain.aggregate_subset(G[sel], coeffs, sel)
                torch.testing.assert_close(u_s, u * scale**degree, rtol=1e-12, atol=0)
                continue
            # float32: the plain run in float64 is the exact answer for these gradients
            exact = plain.aggregate_subset(G[sel].double(), coeffs.double(), sel)
            tol = bound.step(plain, G[sel].double(), sel, exact)
            diff = (u_s.double() - exact * scale**degree).abs()
            assert bool((diff <= tol * scale**degree).all()), float((diff / tol).max())
            # the bound is far below the update (a few 1e-3 of it, up to 6e-2): an error of
            # the update's size, such as a wrong power of the scale, would show
            assert float((tol / exact.abs()).median()) < 1e-2


class _Float32Bound:
    """A first-order bound, per entry, on how far MomentumConFIG's update computed in
    float32 (unit roundoff ``u = 2**-24``) is from the exact one on the same gradients
    (times the scale), from the exact run's state after each step. Operation counts:

    - the input ``G * scale``: one rounding, ``u |g|``; a momentum update
      ``m + (1 - beta_1) (g - m)``: three roundings of terms at most ``max|g|`` (a momentum
      is a convex combination of its gradients), so a momentum updated ``t`` times is off
      by at most ``(1 + 3 t) u max|g|``; the bias correction scales that;
    - the Gram matrix of the ``m`` seen momenta, ``N = 40`` terms: ``N u |m_i||m_j|`` per
      entry, ``m N u`` on the cosine matrix in norm (plus the momenta's own errors,
      relative to their norms), moving ConFIG's weights by ``kappa`` (the cosine matrix's
      condition number) times that relative to their norm, and the final normalisation as
      much again; the ``m``-term sum of the update and the weights' cast to float32:
      ``(m + 1) u sum_i |w_i m_ik|``;
    - the second moment divides by ``s + eps``, ``s`` the root mean square (weights
      summing to 1) of the pseudo-gradients ``(p_t - beta_1 p_{t-1}) / (1 - beta_1)``:
      an error ``d`` of the updates so far moves them by ``(1 + beta_1) / (1 - beta_1) d =
      19 d`` and ``s`` by as much, the result by ``(d + 19 d |out|) / (s + eps)``, plus a
      few roundings of its own (``8 u |out|``).
    """

    u = 2.0**-24

    def __init__(self, kwargs):
        self.beta_1 = kwargs["beta_1"]
        self.second_moment = kwargs["second_moment"]
        self.max_g: torch.Tensor | None = None  # per task and entry, over its gradients
        self.history: torch.Tensor | None = None  # largest bound of the updates so far

    def step(self, exact: MomentumConFIG, grads, tasks, out: torch.Tensor) -> torch.Tensor:
        u, state = self.u, exact.state_dict()
        momenta, counts = state["momenta"], state["counts"]
        if self.max_g is None:
            self.max_g = torch.zeros_like(momenta)
        for row, task in enumerate(tasks):
            self.max_g[task] = torch.maximum(self.max_g[task], grads[row].abs())
        seen = [i for i in range(len(counts)) if counts[i] > 0]
        corr = torch.tensor([1 / (1 - self.beta_1 ** counts[i]) for i in seen])[:, None]
        rows = momenta[seen] * corr
        err = torch.stack([(1 + 3 * counts[i]) * u * self.max_g[i] for i in seen]) * corr
        if len(seen) == 1:
            bound = err[0] + 2 * u * rows[0].abs()
        else:
            w = ConFIG(norm_eps=1e-30).weights(rows @ rows.T, torch.ones(len(seen)) / len(seen))
            m, n = rows.shape
            norms = rows.norm(dim=1)
            cos = (rows @ rows.T) / (norms[:, None] * norms[None, :])
            rel = n * u + 2 * float((err.norm(dim=1) / norms).max())
            kappa = float(torch.linalg.cond(cos))
            bound = (w.abs()[:, None] * (err + (m + 1) * u * rows.abs())).sum(0)
            scale = float((w.abs() * norms).max())
            bound += 2 * kappa * m**1.5 * rel * scale * (rows.abs() / norms[:, None]).sum(0)
        if not self.second_moment:
            return bound
        self.history = bound if self.history is None else torch.maximum(self.history, bound)
        t = state["steps"]
        s = (state["second"] / (1 - exact.beta_2**t)).sqrt()
        return (bound + 19 * self.history * out.abs()) / (s + exact.eps) + 8 * u * out.abs()


def test_momenta_gram_does_not_overflow():
    """float32 gradients whose squared norms overflow float32 (the Gram is taken in float64)."""
    G = _grads(dtype=torch.float32) * 1e18
    agg = MomentumConFIG(beta_1=0.0, second_moment=False, tasks_per_step=3)
    u = agg(G)
    expected = ConFIG()(G.double())
    torch.testing.assert_close(u.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"tasks_per_step": 0}, "tasks_per_step"),
        ({"second_moment": "yes"}, "second_moment"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MomentumConFIG(**kwargs)


class BackwardCounter(lightning.Callback):
    """Counts backward passes through the model: a hook on one parameter fires once per pass."""

    def __init__(self):
        self.passes = 0
        self.steps = 0
        self.losses = []

    def on_fit_start(self, trainer, pl_module):
        next(pl_module.model.parameters()).register_hook(self._count)

    def _count(self, grad):
        self.passes += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(
    "aggregator, passes_per_step",
    [
        ({"_target_": "nequip_mtl.aggregators.MomentumConFIG"}, 1),
        (
            {
                "_target_": "nequip_mtl.aggregators.MomentumConFIG",
                "tasks_per_step": 2,
            },
            2,
        ),
        ({"_target_": "nequip_mtl.aggregators.ConFIG"}, 3),
    ],
)
def test_backward_passes_per_step_in_real_training(aggregator, passes_per_step, tmp_path):
    counter = BackwardCounter()
    module, _ = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        max_epochs=6,
        aggregator=aggregator,
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.002},
        trainer_kwargs=dict(callbacks=[counter]),
    )
    assert counter.steps == 12
    assert counter.passes == passes_per_step * counter.steps
    # it trains: the weighted-sum training loss of the last epoch is below the first's
    first, last = sum(counter.losses[:2]), sum(counter.losses[-2:])
    assert last < first


class RecordingMomentumConFIG(MomentumConFIG):
    """MomentumConFIG that records which tasks the training module back-propagated."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.computed_log = []

    def aggregate_subset(self, grads, coeffs, computed):
        self.computed_log.append(list(computed))
        return super().aggregate_subset(grads, coeffs, computed)


@pytest.mark.parametrize("k", [1, 2])
def test_round_robin_in_real_training(k, tmp_path):
    """The tasks the module back-propagates cycle 0, 1, 2, 0, ... from the first step."""
    module, _ = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        max_epochs=3,
        aggregator={
            "_target_": "tests.test_momentum_config.RecordingMomentumConFIG",
            "tasks_per_step": k,
        },
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.002},
    )
    log = module.aggregator.computed_log
    assert len(log) == 6
    assert log == (ROUND_ROBIN[k] + ROUND_ROBIN[k])[:6]
