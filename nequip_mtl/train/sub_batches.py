"""One forward pass per training dataset: a mixed batch split into per-dataset sub-batches.

The cost of a NequIP forward and backward pass is linear in the atoms, so forwarding each
dataset's frames on their own costs about one batch in total; each dataset's loss then
depends on its own sub-batch's graph only, and back-propagating it costs that sub-batch's
share of a backward pass instead of a pass over the whole batch.

The sub-batches' outputs are concatenated into one output dict for the loss and the
metrics, a :class:`SubBatchOutput` that also keeps each dataset's own output: a per-dataset
loss component (:class:`~nequip_mtl.train.DatasetModifier`) reads its dataset's part there,
so its graph holds that sub-batch only, and back-propagating it never reaches another
sub-batch. (Reaching it through the concatenation would run that sub-batch's backward on
zeros: under train-time compile the whole compiled backward graph, one autograd node that
materialises zero gradients.) Readers of the concatenated fields themselves go through
:func:`cat_isolated`, whose backward gives no gradient to a part whose slice is exactly
zero, so that eager autograd skips that part's graph.
"""

from __future__ import annotations

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


def sub_batch_part(data: AtomicDataDict.Type, dataset_index: int) -> AtomicDataDict.Type | None:
    """Dataset ``dataset_index``'s own sub-batch output when ``data`` is a
    :class:`SubBatchOutput` holding it, else ``None``."""
    return data.parts.get(dataset_index) if isinstance(data, SubBatchOutput) else None


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


def forward_per_dataset(module, batch: AtomicDataDict.Type, keep_parts: bool = True):
    """``(output, inputs)``: the model's output on each dataset's sub-batch, concatenated (a
    :class:`SubBatchOutput`), and the correspondingly ordered input batch (frames grouped by
    dataset). Back-propagating a loss that reads one dataset's frames (through its part, or
    through the concatenation) runs that dataset's sub-batch graph only. ``keep_parts:
    false``: a plain output dict (every loss reads the concatenation)."""
    subs = sub_batches(batch)
    if len(subs) == 1:
        return module(batch), batch
    parts = {d: module(sub) for d, sub in subs.items()}
    # a compiled model's output holds only the fields it computes, and may differ between
    # sub-batches in which inputs it passes through: concatenate the fields all of them have
    common = set.intersection(*(set(o) for o in parts.values()))
    outputs = [{k: v for k, v in o.items() if k in common} for o in parts.values()]
    output = batched_outputs(outputs)
    if keep_parts:
        output = SubBatchOutput(output, parts)
    return output, AtomicDataDict.batched_from_list(list(subs.values()))
