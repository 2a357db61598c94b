"""The selection rule of the sub-batch contract (``nequip_mtl.train.sub_batches``), on
small autograd graphs whose reach is known: a dataset's selection from a forwarded-apart
output reaches its own part's graph only; an absent dataset's selection reaches none; on
a plain output the selection is the masked rows of the one graph.

The other rules are checked on real NequIP models: the forward and the isolation in
``tests/test_sub_batch_backward.py`` (an opaque node stands for a compiled sub-batch),
the absent dataset's exact, connected zero in ``tests/test_per_dataset.py``, eager against
compile in ``tests/test_dataset_tasks.py``, and the grouping of tasks by the graphs they
reach in ``tests/test_task_kinds.py``.
"""

from __future__ import annotations

import torch

from nequip_mtl.train.sub_batches import SubBatchOutput, cat_isolated, dataset_part


def read(data):
    return data["forces"]


def _apart():
    """Two datasets' parts, each on a leaf of its own, and their concatenation."""
    leaves = [torch.randn(n, 3, dtype=torch.float64).requires_grad_() for n in (3, 2)]
    parts = {d: {"forces": 2.0 * leaf} for d, leaf in enumerate(leaves)}
    output = SubBatchOutput({"forces": cat_isolated([p["forces"] for p in parts.values()])}, parts)
    mask = torch.tensor([False] * 3 + [True] * 2)  # dataset 1's rows
    return leaves, parts, output, mask


def test_a_datasets_selection_reaches_its_own_part_only():
    leaves, parts, output, mask = _apart()
    selected = dataset_part(read, output, 1, mask)
    assert selected is parts[1]["forces"]  # the part itself, not the masked concatenation
    torch.testing.assert_close(selected, output["forces"][mask], rtol=0, atol=0)
    other, own = torch.autograd.grad(selected.sum(), leaves, allow_unused=True)
    assert other is None and torch.equal(own, torch.full_like(own, 2.0))


def test_an_absent_datasets_selection_is_empty_and_reaches_no_graph():
    leaves, parts, output, mask = _apart()
    empty = dataset_part(read, output, 2, torch.zeros_like(mask))
    assert empty.shape == (0, 3) and not empty.requires_grad
    assert dataset_part(read, output, None, torch.zeros_like(mask)).shape == (0, 3)


def test_on_a_plain_output_the_selection_is_the_masked_rows_of_the_one_graph():
    leaf = torch.randn(5, 3, dtype=torch.float64).requires_grad_()
    output = {"forces": 2.0 * leaf}
    mask = torch.tensor([True, False, True, False, False])
    selected = dataset_part(read, output, 0, mask)
    torch.testing.assert_close(selected, 2.0 * leaf[mask], rtol=0, atol=0)
    (grad,) = torch.autograd.grad(selected.sum(), leaf)
    assert torch.equal(grad, 2.0 * mask[:, None].expand(5, 3).to(grad.dtype))
    empty = dataset_part(read, output, 0, torch.zeros_like(mask))  # absent: connected
    assert empty.shape == (0, 3) and empty.requires_grad
