"""``python -m benchmarks.aggregation_cost``: the step it times is the aggregation the
aggregator defines (the applied ``.grad`` equals ``aggregator.aggregate`` of the task
rows, computed here from the rows directly), and a tiny run times every aggregator and
regenerates its table from its json."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import nequip_mtl.aggregators as aggregators
from benchmarks import aggregation_cost as AC
from benchmarks import methods as M
from nequip_mtl.step import TaskGradients

GRAM = [c for c in M.aggregator_classes() if issubclass(c, aggregators.GramAggregator)]


@pytest.mark.parametrize("cls", GRAM, ids=[c.__name__ for c in GRAM])
def test_timed_step_applies_the_aggregators_update(cls):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (5, 7)]
    storage = TaskGradients(params, 3)
    # task i's gradient is rows[i]: the loss sum_p <rows[i]_p, p>, back-propagated into row i
    rows = torch.randn((3, 12), generator=gen, dtype=torch.float64)
    storage.zero_()
    for i in range(3):
        loss = (rows[i, :5] * params[0]).sum() + (rows[i, 5:] * params[1]).sum()
        storage.backward(i, loss, retain_graph=False)
    coeffs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    AC._one_step(cls, storage, 3, coeffs)()
    applied = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(applied, cls().aggregate(rows, coeffs), rtol=1e-10, atol=1e-12)
    storage.close()


def test_tiny_run_times_every_aggregator_and_regenerates(tmp_path):
    args = SimpleNamespace(params=[800], tasks=[2, 3], dtypes=["float32"], repeats=1)
    data = AC.run(args)
    names = [c.__name__ for c in M.aggregator_classes()]
    assert [r["aggregator"] for r in data["results"]] == names * 2
    assert all(r["ms"] > 0 for r in data["results"])
    md = AC.markdown(data)
    assert md.splitlines()[2] == "| params | dtype | tasks | " + " | ".join(names) + " |"
    AC.report(data, tmp_path / "ac")
    assert (tmp_path / "ac.md").read_text() == md
