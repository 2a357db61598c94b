"""A fixed model's predictions on one dataset's frames, put in place of the labels of a batch.

The forgetting budget compares the fine-tuned model's loss on a batch of replayed frames
with the pretrained model's loss on *the same frames*: recorded once, before the first
step, as that model's predictions, and looked up by each frame's position in its dataset
(:data:`~nequip_mtl.data.keys.FRAME_INDEX_KEY`). The pretrained model's loss on a batch is
then the loss of those predictions against the batch's labels: the loss's own metrics, so
that any metric (per-atom energy, forces, stress; MSE, MAE, Huber, per-type) pairs up.

Pure torch; no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from nequip.data import AtomicDataDict
from nequip.data._key_registry import _GRAPH_FIELDS, _NODE_FIELDS

from .keys import FRAME_INDEX_KEY

_BATCH, _NUM_ATOMS = AtomicDataDict.BATCH_KEY, AtomicDataDict.NUM_NODES_KEY
#: the structure itself, which the model reads and returns: never substituted
_GEOMETRY = {AtomicDataDict.POSITIONS_KEY, AtomicDataDict.CELL_KEY, AtomicDataDict.PBC_KEY}


class FramePredictions:
    """Per-frame (graph) and per-atom (node) predictions of a model on a dataset's frames.

    Build it with :meth:`record` from batches of consecutive frames; :meth:`substitute`
    returns a copy of a batch whose chosen frames carry these predictions instead of their
    labels. Kept in a checkpoint with :meth:`state_dict`.

    Args:
        graph: per-frame fields, each ``(num_frames, ...)``
        node: per-atom fields, each ``(total_atoms, ...)``, the frames' atoms in order
        num_atoms: ``(num_frames,)`` atoms per frame
    """

    def __init__(
        self,
        graph: dict[str, torch.Tensor],
        node: dict[str, torch.Tensor],
        num_atoms: torch.Tensor,
    ) -> None:
        self.graph, self.node = dict(graph), dict(node)
        self.num_atoms = num_atoms.to(torch.long).reshape(-1)
        #: the first atom of every frame in the node fields
        self.starts = torch.cumsum(self.num_atoms, 0) - self.num_atoms

    @classmethod
    def record(
        cls, pairs: Iterable[tuple[AtomicDataDict.Type, AtomicDataDict.Type]]
    ) -> FramePredictions:
        """From ``(batch, output)`` pairs over consecutive frames (the first batch holds
        frames ``0..``, the next continues): every floating-point node or graph field that
        both the model's output and the batch hold (the labels a loss can compare), but the
        geometry (positions, cell)."""
        graph: dict[str, list] = {}
        node: dict[str, list] = {}
        counts = []
        for batch, output in pairs:
            counts.append(batch[_NUM_ATOMS].detach().reshape(-1).cpu())
            for key, value in output.items():
                if key not in batch or key in _GEOMETRY or not torch.is_tensor(value):
                    continue
                if not value.is_floating_point():
                    continue
                into = graph if key in _GRAPH_FIELDS else node if key in _NODE_FIELDS else None
                if into is not None:
                    into.setdefault(key, []).append(value.detach().cpu())
        if not counts:
            raise ValueError("no frames to record predictions on")
        return cls(
            {k: torch.cat(v) for k, v in graph.items()},
            {k: torch.cat(v) for k, v in node.items()},
            torch.cat(counts),
        )

    def __len__(self) -> int:
        return int(self.num_atoms.numel())

    def substitute(self, batch: AtomicDataDict.Type, rows: torch.Tensor) -> AtomicDataDict.Type:
        """A copy of ``batch`` whose frames ``rows`` (a ``(num_frames,)`` bool mask) carry the
        recorded predictions of the frames named by their ``frame_index``; the other frames
        keep the batch's values. Refuses frames that are not the recorded ones (another
        atom count, or an index past the end)."""
        out = dict(batch)
        if not bool(rows.any()):
            return out
        index = batch[FRAME_INDEX_KEY].reshape(-1)[rows].cpu()
        if int(index.max()) >= len(self) or int(index.min()) < 0:
            raise ValueError(
                f"a batch names frame {int(index.max())} of a dataset whose predictions were "
                f"recorded on {len(self)} frames"
            )
        counts = batch[_NUM_ATOMS].reshape(-1)[rows].cpu()
        if not torch.equal(self.num_atoms[index], counts.to(torch.long)):
            raise ValueError(
                "the batch's frames are not those the predictions were recorded on (their atom "
                "counts differ): the dataset changed since"
            )
        for key, table in self.graph.items():
            value = out[key].clone()
            value[rows] = table[index].to(value.device, value.dtype)
            out[key] = value
        if self.node:
            graph_of = batch[_BATCH].reshape(-1)
            per_frame = batch[_NUM_ATOMS].reshape(-1)
            first = torch.cumsum(per_frame, 0) - per_frame  # each frame's first atom here
            atoms = rows[graph_of]
            local = torch.arange(graph_of.numel(), device=graph_of.device) - first[graph_of]
            frame = batch[FRAME_INDEX_KEY].reshape(-1)[graph_of]
            where = (self.starts.to(local.device)[frame] + local)[atoms].cpu()
            for key, table in self.node.items():
                value = out[key].clone()
                value[atoms] = table[where].to(value.device, value.dtype)
                out[key] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"graph": dict(self.graph), "node": dict(self.node), "num_atoms": self.num_atoms}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FramePredictions:
        return cls(state["graph"], state["node"], state["num_atoms"])
