"""One forward pass per training dataset, and the contract every per-dataset loss keeps.

The cost of a NequIP forward and backward pass is linear in the atoms, so forwarding each
dataset's frames on their own (:func:`forward_per_dataset`) costs about one batch in total;
each dataset's loss then depends on its own sub-batch's graph only, and back-propagating it
costs that sub-batch's share of a backward pass instead of a pass over the whole batch.

**The contract** (here, and only here; property tests in ``tests/test_sub_batch_contract.py``):

1. *Forward.* A batch holding several datasets is forwarded one dataset at a time; the
   outputs are concatenated (frames grouped by dataset, the labels reordered to match) into
   a :class:`SubBatchOutput`, which also keeps each dataset's own output in ``parts``.
2. *Isolation.* The concatenated fields that carry a gradient are joined by
   :func:`cat_isolated`, whose backward gives no gradient to a part whose slice is exactly
   zero: a reader of the concatenation back-propagates through the parts it read only.
3. *Selection* (:func:`dataset_part`, what :class:`~nequip_mtl.train.DatasetModifier`
   calls): a per-dataset loss reads its dataset's own part, so its graph holds that
   sub-batch only; a dataset without frames in the batch selects an empty, detached
   tensor, connected to no sub-batch's graph (its metric is an exact zero that no backward
   pass runs into). On a plain output (one forward pass, nequip's weighted sum) a loss
   reads the masked rows of the one graph, and an absent dataset is an exact zero with an
   exactly zero gradient.

Reaching another sub-batch's graph, even with zeros, would run that sub-batch's backward
pass for nothing: under train-time compile its whole compiled backward graph, one autograd
node that materialises zero gradients. So the training module groups the tasks by the
sub-batch graphs their losses reach (:meth:`~nequip_mtl.step.TaskPlan.graph_groups`) and
back-propagates each group on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from nequip.data import AtomicDataDict, _key_registry

from ..data.keys import DATASET_INDEX_KEY


def select_frames(data: AtomicDataDict.Type, frames: torch.Tensor) -> AtomicDataDict.Type:
    """The batch of the frames ``frames`` (increasing positions) of a batched data dict.

    Equal to nequip's ``batched_from_list([frame_from_batched(data, i) for i in frames])``,
    in one indexing pass per field.
    """
    batch = data[AtomicDataDict.BATCH_KEY]
    num = AtomicDataDict.num_frames(data)
    frame_mask = torch.zeros(num, dtype=torch.bool, device=batch.device)
    frame_mask[frames] = True
    node_mask = frame_mask[batch]
    new_node = torch.cumsum(node_mask, 0) - 1
    new_frame = torch.cumsum(frame_mask, 0) - 1
    edge_mask = None
    if AtomicDataDict.EDGE_INDEX_KEY in data:
        edge_mask = node_mask[data[AtomicDataDict.EDGE_INDEX_KEY][0]]
    out = {}
    for key, value in data.items():
        if value.numel() == 0:
            continue
        if key == AtomicDataDict.EDGE_INDEX_KEY:
            out[key] = new_node[value[:, edge_mask]]
        elif key == AtomicDataDict.BATCH_KEY:
            out[key] = new_frame[batch[node_mask]]
        elif key in _key_registry._GRAPH_FIELDS:
            out[key] = value[frame_mask]
        elif key in _key_registry._NODE_FIELDS:
            out[key] = value[node_mask]
        elif key in _key_registry._EDGE_FIELDS:
            out[key] = value[edge_mask]
        else:
            raise KeyError(f"Unregistered key {key}")
    return out


def sub_batches(data: AtomicDataDict.Type) -> dict[int, AtomicDataDict.Type]:
    """``{dataset index: sub-batch}`` of the datasets in a batch, in increasing index."""
    if DATASET_INDEX_KEY not in data:
        raise KeyError(
            f"a forward pass per dataset needs the per-frame field `{DATASET_INDEX_KEY}`: use "
            "nequip_mtl.data.MultiDatasetDataModule as the data module (its frames carry it)"
        )
    index = data[DATASET_INDEX_KEY].reshape(-1)
    datasets = [int(d) for d in torch.unique(index)]
    if len(datasets) == 1:
        return {datasets[0]: data}
    return {d: select_frames(data, (index == d).nonzero().reshape(-1)) for d in datasets}


def split_by_dataset(data: AtomicDataDict.Type) -> list[AtomicDataDict.Type]:
    """The per-dataset sub-batches of a batch, in increasing dataset index."""
    return list(sub_batches(data).values())


class SubBatchOutput(dict):
    """The model's output on a batch forwarded one dataset at a time: the concatenated
    output dict (an ``AtomicDataDict``, frames grouped by dataset), with each dataset's own
    sub-batch output in ``parts`` (``{dataset index: output dict}``; a copy of the dict is a
    plain dict without them)."""

    def __init__(self, output: AtomicDataDict.Type, parts: dict[int, AtomicDataDict.Type]):
        super().__init__(output)
        self.parts = parts


def dataset_part(
    read: Callable[[AtomicDataDict.Type], torch.Tensor],
    output: AtomicDataDict.Type,
    dataset_index: int | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    """One dataset's rows of ``read(output)`` (rule 3 of the module's contract).

    Args:
        read: reads a field of an output dict (e.g. a nequip field modifier)
        output: the model's output; a :class:`SubBatchOutput` on a batch forwarded one
            dataset at a time
        dataset_index: the dataset (``None``: select nothing)
        mask: the dataset's rows of ``read(output)`` in the concatenated output

    Returns ``read`` of the dataset's own part when ``output`` holds it (graph: that
    sub-batch only); on a :class:`SubBatchOutput` without it, the empty selection,
    detached (graph: none); on a plain output, ``read(output)[mask]`` (graph: the batch's).
    """
    if isinstance(output, SubBatchOutput):
        part = output.parts.get(dataset_index)
        if part is not None:
            return read(part)
        empty = read(output)[torch.zeros_like(mask)]
        return empty.detach()
    return read(output)[mask]


class _IsolatedCat(torch.autograd.Function):
    """``torch.cat(parts)`` along the first dimension; in the backward pass a part whose
    slice of the incoming gradient is exactly zero gets no gradient (``None``), so autograd
    does not run that part's graph on zeros. If every slice is zero, every part gets its
    (zero) slice, as with ``torch.cat``."""

    @staticmethod
    def forward(ctx, *parts):
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        slices = grad.split(ctx.sizes, 0)
        nonzero = [bool(s.any()) for s in slices]  # NaN counts as non-zero
        if not any(nonzero):
            return slices
        return tuple(s if nz else None for s, nz in zip(slices, nonzero))


def cat_isolated(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 0)``, with the same values and the same gradients, whose backward
    pass skips the parts that receive an exactly zero gradient (see :class:`_IsolatedCat`):
    a loss that reads only one part's rows back-propagates through that part's graph only."""
    return _IsolatedCat.apply(*parts)


def batched_outputs(outputs: list[AtomicDataDict.Type]) -> AtomicDataDict.Type:
    """nequip's ``batched_from_list`` of the sub-batches' outputs, the fields that carry a
    gradient concatenated by :func:`cat_isolated`."""
    grad_keys = {
        k for k, v in outputs[0].items() if any(o[k].requires_grad for o in outputs)
    }  # fmt: skip
    plain = AtomicDataDict.batched_from_list(
        [{k: v for k, v in o.items() if k not in grad_keys} for o in outputs]
    )
    out = {}
    for k in outputs[0]:  # the outputs' key order
        out[k] = cat_isolated([o[k] for o in outputs]) if k in grad_keys else plain[k]
    return out


def forward_per_dataset(module, batch: AtomicDataDict.Type):
    """``(output, inputs)``: the model's output on each dataset's sub-batch, concatenated (a
    :class:`SubBatchOutput`), and the correspondingly ordered input batch (frames grouped by
    dataset). Back-propagating a loss that reads one dataset's frames (through its part, or
    through the concatenation) runs that dataset's sub-batch graph only. A batch of one
    dataset is forwarded as it is (a plain output dict)."""
    subs = sub_batches(batch)
    if len(subs) == 1:
        return module(batch), batch
    parts = {d: module(sub) for d, sub in subs.items()}
    # a compiled model's output holds only the fields it computes, and may differ between
    # sub-batches in which inputs it passes through: concatenate the fields all of them have
    common = set.intersection(*(set(o) for o in parts.values()))
    outputs = [{k: v for k, v in o.items() if k in common} for o in parts.values()]
    output = SubBatchOutput(batched_outputs(outputs), parts)
    return output, AtomicDataDict.batched_from_list(list(subs.values()))
