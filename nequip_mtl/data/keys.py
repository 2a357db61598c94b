"""Field names this package adds to nequip's data dicts.

Importing this module registers them with nequip's field registry
(:func:`nequip.data.register_fields`), so that nequip batches, type-checks and
(de)serialises them like its own fields.

Packaged models import this module (the per-dataset modules of :mod:`nequip_mtl.model` read
``dataset_index``), so it imports nequip's registry module itself, not the ``nequip.data``
package, whose ``__init__`` imports ASE and Lightning, which ``nequip-package`` does not
package.
"""

from nequip.data._key_registry import register_fields

#: per-frame (graph) field: the position of the frame's training dataset in
#: ``MultiDatasetDataModule``'s ``datasets`` (an integer tensor of shape ``(num_frames,)``
#: in a batch)
DATASET_INDEX_KEY = "dataset_index"

#: per-frame (graph) field: the frame's position in its dataset's split (what
#: :class:`~nequip_mtl.data.frame_predictions.FramePredictions` looks a frame up by)
FRAME_INDEX_KEY = "frame_index"

register_fields(
    graph_fields=[DATASET_INDEX_KEY, FRAME_INDEX_KEY],
    long_fields=[DATASET_INDEX_KEY, FRAME_INDEX_KEY],
)
