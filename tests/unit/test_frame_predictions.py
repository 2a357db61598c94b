"""``FramePredictions``: a fixed model's predictions put in place of a batch's labels, frame
by frame (checked against the frames built by hand)."""

from __future__ import annotations

import pytest
import torch
from nequip.data import AtomicDataDict

from nequip_mtl.data.frame_predictions import FramePredictions
from nequip_mtl.data.keys import DATASET_INDEX_KEY, FRAME_INDEX_KEY

E, F, POS = AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY, AtomicDataDict.POSITIONS_KEY


def frame(n: int, position: int, dataset: int = 0, label: float = 0.0) -> dict:
    """A frame of ``n`` atoms whose labels are ``label`` everywhere."""
    return {
        POS: torch.randn(n, 3, dtype=torch.float64),
        AtomicDataDict.ATOM_TYPE_KEY: torch.zeros(n, dtype=torch.long),
        E: torch.full((1, 1), label, dtype=torch.float64),
        F: torch.full((n, 3), label, dtype=torch.float64),
        DATASET_INDEX_KEY: torch.tensor([dataset]),
        FRAME_INDEX_KEY: torch.tensor([position]),
    }


def prediction(i: int, n: int) -> dict:
    """The "model's" prediction on frame ``i``: energy ``100 i``, forces ``i + atom / 10``."""
    forces = (i + torch.arange(n, dtype=torch.float64) / 10).unsqueeze(1).expand(n, 3)
    return {E: torch.tensor([[100.0 * i]], dtype=torch.float64), F: forces.clone()}


SIZES = [2, 3, 1, 4, 2]  # atoms of the recorded dataset's frames 0..4


@pytest.fixture
def recorded() -> FramePredictions:
    frames = [frame(n, i) for i, n in enumerate(SIZES)]
    pairs = []
    for start in (0, 2, 4):  # batches of consecutive frames: 0-1, 2-3, 4
        batch = AtomicDataDict.batched_from_list(frames[start : start + 2])
        out = [prediction(i, SIZES[i]) for i in range(start, min(start + 2, len(SIZES)))]
        output = {E: torch.cat([o[E] for o in out]), F: torch.cat([o[F] for o in out]),
                  POS: batch[POS] + 1.0}  # fmt: skip
        pairs.append((batch, output))
    return FramePredictions.record(pairs)


def test_the_recorded_frames_predictions_replace_the_labels_of_the_chosen_frames(recorded):
    """A batch mixing recorded frames (3, 0) in another order with a frame of another
    dataset: the recorded ones carry their own predictions, the other keeps its labels;
    the geometry is never replaced."""
    assert len(recorded) == len(SIZES) and set(recorded.graph) == {E}
    assert set(recorded.node) == {F}  # positions are the structure, not a prediction
    frames = [frame(SIZES[3], 3), frame(5, 0, dataset=1, label=-7.0), frame(SIZES[0], 0)]
    batch = AtomicDataDict.batched_from_list(frames)
    rows = batch[DATASET_INDEX_KEY] == 0
    out = recorded.substitute(batch, rows)
    expected = [prediction(3, SIZES[3]), {E: frames[1][E], F: frames[1][F]},
                prediction(0, SIZES[0])]  # fmt: skip
    torch.testing.assert_close(out[E], torch.cat([x[E] for x in expected]), rtol=0, atol=0)
    torch.testing.assert_close(out[F], torch.cat([x[F] for x in expected]), rtol=0, atol=0)
    torch.testing.assert_close(out[POS], batch[POS], rtol=0, atol=0)
    assert torch.equal(batch[E][1], frames[1][E][0])  # the batch itself is not modified
    assert torch.equal(batch[E][0], frames[0][E][0])


def test_frames_that_were_not_recorded_are_refused(recorded):
    other = AtomicDataDict.batched_from_list([frame(SIZES[1] + 1, 1)])  # frame 1, other size
    with pytest.raises(ValueError, match="atom counts differ"):
        recorded.substitute(other, torch.tensor([True]))
    past = AtomicDataDict.batched_from_list([frame(2, len(SIZES))])
    with pytest.raises(ValueError, match="names frame 5 of a dataset whose predictions were"):
        recorded.substitute(past, torch.tensor([True]))


def test_the_state_round_trips(recorded):
    again = FramePredictions.from_state_dict(recorded.state_dict())
    batch = AtomicDataDict.batched_from_list([frame(SIZES[4], 4), frame(SIZES[2], 2)])
    rows = torch.tensor([True, True])
    for key in (E, F):
        torch.testing.assert_close(
            again.substitute(batch, rows)[key], recorded.substitute(batch, rows)[key]
        )
