"""Per-dataset sub-batches equal nequip's own frame selection and batching."""

import pytest
import torch
from nequip.data import AtomicDataDict

from nequip_mtl.data.keys import DATASET_INDEX_KEY
from nequip_mtl.train.sub_batches import select_frames, split_by_dataset
from tests._harness import datamodule


@pytest.fixture(scope="module")
def batch():
    dm = datamodule(num_frames=12, train=8, val=4, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("frames", [[1, 4, 5, 7], [0], [0, 1, 2, 3, 4, 5, 6, 7], [6, 7]])
def test_select_frames_equals_nequip_frame_by_frame(batch, frames):
    ours = select_frames(batch, torch.tensor(frames))
    ref = AtomicDataDict.batched_from_list(
        [AtomicDataDict.frame_from_batched(batch, i) for i in frames]
    )
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def test_split_by_dataset_groups_frames_in_dataset_order(batch):
    data = dict(batch)
    index = torch.tensor([1, 0, 1, 1, 0, 2, 0, 1])
    data[DATASET_INDEX_KEY] = index
    subs = split_by_dataset(data)
    assert [sub[DATASET_INDEX_KEY].tolist() for sub in subs] == [[0, 0, 0], [1, 1, 1, 1], [2]]
    for d, sub in enumerate(subs):
        frames = (index == d).nonzero().reshape(-1)
        torch.testing.assert_close(sub["total_energy"], batch["total_energy"][frames])
    with pytest.raises(KeyError, match="MultiDatasetDataModule"):
        split_by_dataset(batch)
