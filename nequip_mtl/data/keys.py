"""Field names this package adds to nequip's data dicts."""

#: per-frame (graph) field: the position of the frame's training dataset in
#: ``MultiDatasetDataModule``'s ``datasets`` (an integer tensor of shape ``(num_frames,)``
#: in a batch)
DATASET_INDEX_KEY = "dataset_index"
