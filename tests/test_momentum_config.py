"""MomentumConFIG: closed forms, state, and one backward pass per step in real training."""

import copy

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


@pytest.mark.parametrize(
    "k, expected", [(1, [[0], [1], [2], [0]]), (2, [[0, 1], [0, 2], [1, 2], [0, 1]])]
)
def test_round_robin(k, expected):
    agg = MomentumConFIG(tasks_per_step=k)
    assert [agg.select_tasks(3) for _ in range(4)] == expected


def test_state_dict_round_trip_continues_identically():
    a = MomentumConFIG()
    coeffs = torch.full((3,), 1 / 3, dtype=torch.float64)
    for seed in range(4):
        sel = a.select_tasks(3)
        a.aggregate_subset(_grads(seed=seed)[sel], coeffs, sel)
    b = MomentumConFIG()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for seed in range(4, 8):
        G = _grads(seed=seed)
        sa, sb = a.select_tasks(3), b.select_tasks(3)
        assert sa == sb
        torch.testing.assert_close(
            a.aggregate_subset(G[sa], coeffs, sa),
            b.aggregate_subset(G[sb], coeffs, sb),
            rtol=0,
            atol=0,
        )


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
