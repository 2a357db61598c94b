"""Per-dataset sub-batches equal nequip's own frame selection and batching."""

import pytest
import torch
from nequip.data import AtomicDataDict

from nequip_mtl.data.keys import DATASET_INDEX_KEY
from nequip_mtl.train.sub_batches import forward_per_dataset, select_frames, split_by_dataset
from tests._harness import datamodule, model_config


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


def test_forwarded_apart_labels_line_up_with_the_outputs(batch):
    """A mixture-sampled batch interleaves the datasets (dataset_index 1, 0, 1, 0); forwarded
    one dataset at a time, the outputs come grouped by dataset (frames 1, 3, 0, 2), and so
    must the labels returned with them: each output frame is the model on the frame whose
    labels sit at the same position (a real float64 NequIP model on each frame alone: the
    same sums over the frame's own atoms and edges, equal up to float64 reduction order,
    rtol 1e-12 = ~1e4 eps; the frames' energies differ far more).

    Fails if ``forward_per_dataset`` returns the batch as it came (in sampled order) with
    the grouped outputs."""
    from nequip.model import NequIPGNNModel

    data = select_frames(batch, torch.arange(4))
    data[DATASET_INDEX_KEY] = torch.tensor([1, 0, 1, 0])
    config = model_config()
    assert config.pop("_target_") == "nequip.model.NequIPGNNModel"
    model = NequIPGNNModel(**config)
    output, labels = forward_per_dataset(model, data)
    order = [1, 3, 0, 2]
    alone = [AtomicDataDict.frame_from_batched(data, i) for i in order]
    expected = torch.cat([model(dict(f))[AtomicDataDict.TOTAL_ENERGY_KEY] for f in alone])
    torch.testing.assert_close(
        output[AtomicDataDict.TOTAL_ENERGY_KEY].detach(), expected.detach(), rtol=1e-12, atol=0
    )
    assert labels[DATASET_INDEX_KEY].tolist() == [0, 0, 1, 1]
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        assert torch.equal(labels[key], torch.cat([f[key] for f in alone])), key
