"""The backward pass of a dataset's loss runs its own sub-batch's graph only.

``forward_per_dataset`` concatenates the sub-batches' outputs for the loss; with a plain
``torch.cat`` every backward pass would also run the other sub-batches' graphs on zero
gradients (the cost of a whole-batch backward). Checked: the concatenation has the values
and gradients of ``torch.cat``; a part whose gradient slice is zero is not run (counted by
an autograd function in its graph, and by tensor hooks on a real NequIP model's
sub-batch outputs); a dataset task's gradient equals the one through ``torch.cat``; no
autograd graph outlives a dataset-task training step.
"""

from __future__ import annotations

import pytest
import torch
from nequip.data import AtomicDataDict

import nequip_mtl.train as mtl
from nequip_mtl.train.sub_batches import cat_isolated, forward_per_dataset, split_by_dataset
from tests._harness import module_kwargs, multi, trainer
from tests.test_module_hygiene import SavedTensorCensus

BALANCED = {"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}}
LOSS = {
    "_target_": "nequip_mtl.train.PerDatasetLoss",
    "datasets": ["a", "b"],
    "coeffs": {"total_energy": 1.0, "forces": 1.0},
}


def _parts(seen: list):
    """Two leaves and a small graph on each; ``seen`` gets ``(part, ran)`` per backward
    visit of the part's graph, ``ran``: whether it received a gradient tensor (autograd
    visits a part without one, but runs none of its backward formulas)."""
    gen = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_() for n in (4, 2)
    ]
    parts = []
    for i, x in enumerate(leaves):
        y = x.sin()
        y.register_hook(lambda g, i=i: seen.append((i, g is not None)))
        parts.append(y * x)
    return leaves, parts


@pytest.mark.parametrize("rows", [slice(0, 4), slice(4, 6), slice(1, 5)], ids=["a", "b", "both"])
def test_cat_isolated_has_cats_values_and_gradients_and_skips_zero_parts(rows):
    weights = torch.linspace(0.5, 2.0, 18, dtype=torch.float64).reshape(6, 3)
    grads, seen = {}, {torch.cat: [], cat_isolated: []}
    for cat in (torch.cat, cat_isolated):
        leaves, parts = _parts(seen[cat])
        out = cat(parts, 0) if cat is torch.cat else cat(parts)
        expected = torch.cat([x.sin() * x for x in leaves])
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (out[rows] * weights[rows]).pow(2).sum().backward()
        grads[cat] = [x.grad for x in leaves]
    read = {0, 1} if rows == slice(1, 5) else {0 if rows == slice(0, 4) else 1}
    assert sorted(seen[torch.cat]) == [(0, True), (1, True)]  # both graphs run
    assert sorted(seen[cat_isolated]) == [(i, i in read) for i in (0, 1)]
    for i, (ours, ref) in enumerate(zip(grads[cat_isolated], grads[torch.cat])):
        if i in read:
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        else:  # torch.cat's zeros, never computed
            assert ours is None and not ref.any()


def test_cat_isolated_all_zero_and_non_finite_slices_flow_as_with_cat():
    leaves, parts = _parts([])
    (cat_isolated(parts) * 0.0).sum().backward()  # every slice zero: both parts get zeros
    assert all(x.grad is not None and not x.grad.any() for x in leaves)
    leaves, parts = _parts([])
    out = cat_isolated(parts)
    (out[:4].sum() + out[4:].sum() * float("nan")).backward()  # NaN is not zero
    assert leaves[1].grad is not None and leaves[1].grad.isnan().all()


def _batch_and_model():
    dm = multi(sampling=BALANCED)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        **module_kwargs(loss=LOSS, val_metrics=None, tasks="datasets")
    )
    return batch, module


def _dataset_losses(module, output, inputs, batch) -> dict[str, tuple]:
    """``{dataset: (its loss from output, the same loss from the sub-batches' outputs
    concatenated by torch.cat)}``: per-atom energy + forces MSE."""
    plain = AtomicDataDict.batched_from_list([module(sub) for sub in split_by_dataset(batch)])
    module.loss.reset()
    values = module.loss(output, inputs)
    module.loss.reset()
    ref_values = module.loss(plain, inputs)
    return {
        name: tuple(
            v[f"{name}/per_atom_energy_mse"] + v[f"{name}/forces_mse"] for v in (values, ref_values)
        )
        for name in ("a", "b")
    }


def _assert_grads_equal(ref, params, ours) -> None:
    """``ours`` (a loss's gradients on ``params``) equal the gradients of ``ref``."""
    expected = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    for g, e in zip(ours, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


def test_a_dataset_loss_back_propagates_through_its_own_sub_batch_only():
    batch, module = _batch_and_model()
    params = [p for p in module.parameters() if p.requires_grad]
    positions = []

    def model(sub):  # the module; keeps the positions each sub-batch's graph starts from
        out = module(sub)
        positions.append(out[AtomicDataDict.POSITIONS_KEY])
        return out

    output, inputs = forward_per_dataset(model, batch)
    assert len(positions) == 2 and all(p.requires_grad for p in positions)
    # the same outputs concatenated by torch.cat: the reference gradients
    for d, (task, ref) in enumerate(_dataset_losses(module, output, inputs, batch).values()):
        *ours, own, other = torch.autograd.grad(
            task, [*params, positions[d], positions[1 - d]], retain_graph=True, allow_unused=True
        )
        # the other dataset's graph got no gradient down to its positions: none of it ran
        assert other is None and own is not None and own.abs().sum() > 0
        _assert_grads_equal(ref, params, ours)


class _OpaqueNode(torch.autograd.Function):
    """The identity, as one custom autograd node over a sub-batch's outputs: like the
    compiled model's ``CompiledFunction``, its backward runs (on materialised zero
    gradients) whenever autograd reaches it, whether or not a gradient arrives."""

    @staticmethod
    def forward(ctx, calls, sub, *values):
        ctx.calls, ctx.sub = calls, sub
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx, *grads):
        ctx.calls.append(ctx.sub)
        return (None, None, *grads)


def test_a_dataset_loss_never_reaches_another_sub_batchs_graph():
    """Each dataset's per-dataset loss components read their own sub-batch's output
    (``SubBatchOutput.parts``), so the backward pass of one dataset's loss does not even
    reach the other sub-batch's graph: an opaque node there (as train-time compile makes
    the whole model) is never run. Its gradient equals the one through ``torch.cat``."""
    batch, module = _batch_and_model()
    params = [p for p in module.parameters() if p.requires_grad]
    calls: list[int] = []

    def model(sub):  # the module, its outputs behind one opaque node per sub-batch
        out = module(sub)
        keys = [k for k, v in out.items() if v.requires_grad]
        d = int(sub["dataset_index"].reshape(-1)[0])
        return {**out, **dict(zip(keys, _OpaqueNode.apply(calls, d, *(out[k] for k in keys))))}

    output, inputs = forward_per_dataset(model, batch)
    for d, (task, ref) in enumerate(_dataset_losses(module, output, inputs, batch).values()):
        calls.clear()
        ours = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
        assert calls == [d]  # its own sub-batch's node only
        _assert_grads_equal(ref, params, ours)


@pytest.mark.parametrize("tasks", ["datasets", "components"])
def test_no_autograd_graph_outlives_a_dataset_task_step(tmp_path, tasks):
    """One forward per dataset's sub-batch (also with ``tasks: components``, whose tasks of
    one dataset share its sub-batch's graph): every graph is freed by the step."""
    census = SavedTensorCensus()
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        **module_kwargs(
            loss=LOSS,
            val_metrics=None,
            tasks=tasks,
            forward_per_dataset=True,
            aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        )
    )
    tr = trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[census])
    tr.fit(module, datamodule=multi(sampling=BALANCED))
    assert tr.global_step >= 4 and census.packed > 100 * tr.global_step
    assert census.alive == [0] * tr.global_step
