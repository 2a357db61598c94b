"""Task kinds: which losses form which task, and which forward graphs each task reaches.

A new kind of task is one :class:`~nequip_mtl.step.TaskKind` subclass; ``FieldTasks``
below (one task per loss field across datasets: every dataset's forces together) is such a
kind, written here and trained by the unchanged module and engine. Its update is checked
against the aggregator applied to task gradients computed independently (autograd on the
whole batch, not on the per-dataset sub-batches the module forwards).

The grouping of tasks by forward graph (:meth:`~nequip_mtl.step.TaskPlan.graph_groups`) is
checked by its properties on random plans: the groups partition the active tasks in order,
no two groups reach one graph, and no group splits into two that reach disjoint graphs.
"""

from __future__ import annotations

import random

import pytest
import torch

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import UPGrad
from nequip_mtl.step import EVERY_GRAPH, TaskKind, TaskPlan
from nequip_mtl.train.task_kinds import build_task_kind
from tests.test_dataset_tasks import ForwardCounter, TaskGradientRows, fit, kwargs, loss


class FieldTasks(TaskKind):
    """One task per loss field: ``a/forces_mse`` and ``b/forces_mse`` form ``forces_mse``."""

    name = "fields"
    noun = "field"

    def task_of(self, component: str, dataset: str | None) -> str:
        return component.rsplit("/", 1)[-1]


@pytest.mark.parametrize(
    "spec", [FieldTasks(), {"_target_": "tests.test_task_kinds.FieldTasks"}, "fields"]
)
def test_a_new_task_kind_trains_with_the_unchanged_module(tmp_path, spec):
    """Each field task reads both datasets' sub-batches (one forward per dataset), so its
    backward pass reaches both graphs: the tasks form one group, and the update is
    UPGrad on the independently computed field-task gradients."""
    rec, counter = TaskGradientRows(FieldTasks()), ForwardCounter()
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        callbacks=[rec, counter],
        tasks=spec,
        forward_per_dataset=True,
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    )
    assert module.tasks == "fields" and module.skipped_steps == 0
    assert tr.global_step == len(rec.grads) >= 4
    assert counter.calls == 3 * tr.global_step  # two sub-batches + the callback's forward
    names = ["per_atom_energy_mse", "forces_mse"]
    assert list(module.applied_task_weights) == names
    for grad, rows in zip(rec.grads, rec.tasks):
        coeffs = torch.tensor([rows[n][0] for n in names])
        matrix = torch.stack([rows[n][1] for n in names])
        torch.testing.assert_close(
            grad, UPGrad()(matrix, coeffs / coeffs.sum()), rtol=1e-9, atol=1e-12
        )


def test_a_mixed_loss_reaching_the_whole_batch_is_one_graph_group(tmp_path):
    """A whole-batch component (nequip's own ``forces_mse``) beside per-dataset ones, with
    one forward per dataset: it reads the concatenation and so reaches every sub-batch;
    every task is back-propagated in one group, and each component's gradient is its own."""
    mixed = {
        **loss(),
        "extra_metrics": [
            {
                "name": "all/forces_mse",
                "field": "forces",
                "coeff": 0.5,
                "metric": {"_target_": "nequip.train.MeanSquaredError"},
            }
        ],
    }
    kind = build_task_kind("components")
    rec = TaskGradientRows(kind)
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        callbacks=[rec],
        loss=mixed,
        forward_per_dataset=True,
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    )
    names = list(module.applied_task_weights)
    assert "all/forces_mse" in names and len(names) == 5
    for grad, rows in zip(rec.grads, rec.tasks):
        coeffs = torch.tensor([rows[n][0] for n in names])
        matrix = torch.stack([rows[n][1] for n in names])
        torch.testing.assert_close(
            grad, UPGrad()(matrix, coeffs / coeffs.sum()), rtol=1e-9, atol=1e-12
        )


# ------------------------------------------------------------------ refusals


def test_an_unknown_task_kind_is_refused_with_the_closest_name():
    with pytest.raises(ValueError, match=r"training_module.tasks.*did you mean 'datasets'"):
        mtl.MultitaskLightningModule(**kwargs(tasks="dataset"))


def test_a_target_that_is_not_a_task_kind_is_refused():
    with pytest.raises(TypeError, match=r"training_module.tasks._target_.*not a nequip_mtl"):
        build_task_kind({"_target_": "collections.OrderedDict"})


# ------------------------------------------------------------------ graph groups


def _random_plan(rng: random.Random) -> tuple[TaskPlan, dict]:
    components = [f"c{i}" for i in range(rng.randint(1, 9))]
    graphs = list(range(rng.randint(1, 4)))
    tasks = [f"t{i}" for i in range(rng.randint(1, len(components)))]
    parts: dict[str, dict[str, float]] = {t: {} for t in tasks}
    for i, c in enumerate(components):
        task = tasks[i] if i < len(tasks) else rng.choice(tasks)
        parts[task][c] = 1.0
    graph_of = {c: rng.choice(graphs) for c in components}
    plan = TaskPlan(dict.fromkeys(tasks, 1.0), {t: p for t, p in parts.items() if p})
    return plan, graph_of


@pytest.mark.parametrize("seed", range(200))
def test_graph_groups_partition_the_tasks_by_the_graphs_they_reach(seed):
    rng = random.Random(seed)
    plan, graph_of = _random_plan(rng)
    groups = plan.graph_groups(graph_of)
    flat = [t for g in groups for t in g]
    assert sorted(flat) == sorted(plan.parts)  # a partition of the active tasks
    for g in groups:  # in task order within a group
        assert g == [t for t in plan.parts if t in g]
    reach = [{graph_of[c] for t in g for c in plan.parts[t]} for g in groups]
    for i in range(len(groups)):  # no graph reached by two groups
        for j in range(i + 1, len(groups)):
            assert not reach[i] & reach[j]
    for g in groups:  # no group splits into two parts that reach disjoint graphs
        if len(g) > 1:
            seen, todo = {g[0]}, [g[0]]
            while todo:
                t = todo.pop()
                mine = {graph_of[c] for c in plan.parts[t]}
                for u in g:
                    if u not in seen and mine & {graph_of[c] for c in plan.parts[u]}:
                        seen.add(u)
                        todo.append(u)
            assert seen == set(g)


def test_one_graph_is_no_groups_and_a_whole_batch_component_joins_every_group():
    plan = TaskPlan({"a": 1.0, "b": 1.0}, {"a": {"a/f": 1.0}, "b": {"b/f": 1.0}})
    assert plan.graph_groups(None) is None
    assert plan.graph_groups({"a/f": "a", "b/f": "b"}) == [["a"], ["b"]]
    plan.parts["b"]["f"] = 0.5
    assert plan.graph_groups({"a/f": "a", "b/f": "b", "f": EVERY_GRAPH}) == [["a", "b"]]
