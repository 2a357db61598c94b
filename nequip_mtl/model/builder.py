"""The config builder of the per-dataset modules: :func:`PerDatasetEnergyReferences` wraps any
nequip model with per-dataset energy references (and, optionally, readout heads), from a
table of references given by hand or fitted from the data (:mod:`.reference_fit`).

Part of packaged models: torch and nequip only (no Lightning, no Hydra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import PerTypeScaleShift

from ..data.keys import DATASET_INDEX_KEY
from ..targets import locate
from .dataset_rows import BUILDER, WHERE
from .energy_shifts import DatasetEnergyShifts, type_values
from .graph_fields import add_input_field, graph_models
from .readout_heads import DatasetReadoutHeads
from .reference_fit import ENERGY_REFERENCES_STAT
from .type_embedding import DatasetTypeEmbedding

__all__ = ["PerDatasetEnergyReferences"]


def _builder(target: str):
    """The function a ``_target_`` names (the package's one locator, without Hydra, which
    packaged code must not import)."""
    try:
        found = locate(target)
    except ImportError as err:
        found, cause = None, f" ({err})"
    else:
        cause = ""
    if found is None:
        raise ValueError(
            f"{BUILDER}: `{WHERE}.model._target_` is `{target}`, which is not an importable "
            f"model builder{cause}"
        )
    return found


def _merge_references(references, where: str) -> dict[str, dict]:
    """``references`` is one mapping ``{dataset: {type: value}}`` or a list of them, later
    values replacing earlier ones."""
    layers = references if isinstance(references, (list, tuple)) else [references]
    merged: dict[str, dict] = {}
    for k, layer in enumerate(layers):
        at = f"{where}[{k}]" if isinstance(references, (list, tuple)) else where
        if not isinstance(layer, Mapping):
            raise ValueError(
                f"{BUILDER}: `{at}` must map dataset names to {{type: energy}} mappings, got "
                f"{type(layer).__name__}"
            )
        for dataset, values in layer.items():
            if not isinstance(values, Mapping):
                raise ValueError(
                    f"{BUILDER}: `{at}.{dataset}` must map type names to energies, got "
                    f"{type(values).__name__}"
                )
            merged.setdefault(dataset, {}).update(values)
    return merged


def _resolve_references(
    references, datasets: list[str], type_names: list[str]
) -> list[list[float]]:
    where = f"{WHERE}.references"
    merged = _merge_references(references, where)
    unknown = [d for d in merged if d not in datasets]
    if unknown:
        raise ValueError(
            f"{BUILDER}: `{where}` names dataset(s) {unknown} that are not in `{WHERE}."
            f"datasets` {datasets}"
        )
    table = []
    for dataset in datasets:
        values = merged.get(dataset, {})
        foreign = [t for t in values if t not in type_names]
        if foreign:
            raise ValueError(
                f"{BUILDER}: `{where}.{dataset}` has type(s) {foreign} that are not in the "
                f"model's type_names {type_names}: a dataset's species must all be model types "
                "(add them to the model's `type_names` and the data's "
                "`chemical_species_to_atom_type_map`)"
            )
        missing = [t for t in type_names if values.get(t) is None]
        if missing:
            example = ", ".join(f"{t}: <energy>" for t in missing)
            raise ValueError(
                f"{BUILDER}: no energy reference for type(s) {missing} of dataset "
                f"`{dataset}`: no training frame of `{dataset}` holds them, so they cannot be "
                "fitted from its data. Set them by hand, e.g. the isolated-atom energies at "
                f"that level of theory, by giving `{where}` as a list whose later entries "
                f"replace earlier ones: [${{training_data_stats:{ENERGY_REFERENCES_STAT}}}, "
                f"{{{dataset}: {{{example}}}}}]"
            )
        table.append([float(values[t]) for t in type_names])
    return table


def PerDatasetEnergyReferences(
    model: Mapping | torch.nn.Module,
    datasets: Sequence[str],
    references,
    trainable: bool = False,
    readout_heads: bool = False,
    fidelity_embedding: bool = False,
):
    """Wrap any nequip model with one per-type energy reference per training dataset.

    The wrapped model's own per-type energy scale and shift (nequip's ``PerTypeScaleShift``,
    set as usual from the primary dataset's statistics) stay as they are; each dataset ``d``
    gets a per-type shift so that its frames are predicted with the per-type energy zero
    ``references[d]`` (a :class:`DatasetEnergyShifts` module, choosing per frame by
    ``dataset_index``). Forces and stresses are unchanged by it.

    ``references`` are fitted from each dataset's own training frames by
    :class:`~nequip_mtl.data.MultiDatasetDataModule` (``per_dataset_energy_references``: the
    minimum-norm least-squares fit of frame energies on per-type atom counts), or given by
    hand, e.g. isolated-atom energies; a list of such mappings is merged in order (later
    values replace earlier ones). ``trainable: true`` learns them with the model.

    ``readout_heads: true`` also gives each dataset its own copy of the last linear layer of
    the model's per-atom energy readout (:class:`DatasetReadoutHeads`; NequIP models), each
    starting equal to the model's own; see ``docs/multifidelity.md`` for what it was
    measured to do.

    ``fidelity_embedding: true`` gives each (dataset, atom type) a learned correction of the
    model's atom-type embedding (:class:`DatasetTypeEmbedding`; NequIP models), starting at
    zero: the embedding feeds every layer, so the dataset reaches the hidden layers of the
    shared network, not only its readout.

    To predict at one dataset's level of theory, apply the model modifier
    ``select_fidelity`` (``nequip-package modify ... --modifier select_fidelity
    dataset=<name>``, or ``nequip.model.modify`` in a config): it gives a plain nequip model.

    Example::

        training_module:
          model:
            _target_: nequip_mtl.model.PerDatasetEnergyReferences
            datasets: [dft, xtb]            # the data module's `datasets`, bound by name
            references: ${training_data_stats:per_dataset_energy_references}
            # or by hand, or fitted with some values set by hand:
            # references:
            #   - ${training_data_stats:per_dataset_energy_references}
            #   - {dft: {C: -23.1, H: -0.5, O: -47.3}}
            trainable: false
            readout_heads: false            # true: a per-dataset last readout layer
            fidelity_embedding: false       # true: a per-dataset type-embedding correction
            model:
              _target_: nequip.model.NequIPGNNModel
              seed: 123
              model_dtype: float32
              type_names: [C, H, O]
              r_max: 4.5
              num_layers: 2
              num_features: 32
              avg_num_neighbors: ${training_data_stats:num_neighbors_mean}
              per_type_energy_shifts: ${training_data_stats:per_atom_energy_mean}
              per_type_energy_scales: ${training_data_stats:forces_rms}

    Args:
        model: the shared model: a nequip model config (any builder: ``NequIPGNNModel``,
            Allegro's ``AllegroModel``, ``ModelFromCheckpoint``, ...) or a built model
        datasets: the training datasets' names, in any order (bound by name to the data
            module's datasets when training starts)
        references: ``{dataset: {type: energy}}`` (or a list of them, merged in order)
        trainable: learn the references (default: fixed)
        readout_heads: one last readout layer per dataset (default: one shared readout)
        fidelity_embedding: a per-dataset correction of the type embedding (default: none)
    """
    if isinstance(model, Mapping):
        config = dict(model)
        if "_target_" not in config:
            raise ValueError(f"{BUILDER}: `{WHERE}.model` needs a `_target_` (a model builder)")
        model = _builder(config.pop("_target_"))(**config)
    datasets = list(datasets) if not isinstance(datasets, str) else [datasets]
    if not datasets or len(set(datasets)) != len(datasets):
        raise ValueError(
            f"{BUILDER}: `{WHERE}.datasets` must list the data module's datasets, "
            f"each once; got {datasets}"
        )
    options = (
        ("trainable", trainable),
        ("readout_heads", readout_heads),
        ("fidelity_embedding", fidelity_embedding),
    )
    for key, value in options:
        if not isinstance(value, bool):
            raise ValueError(f"{BUILDER}: `{WHERE}.{key}` must be true or false, got {value!r}")
    graphs = graph_models(model)
    if not graphs:
        raise ValueError(f"{BUILDER}: `{WHERE}.model` did not build a nequip GraphModel")
    type_names = list(graphs[0].type_names)
    # by class name: a model loaded from a package (`ModelFromPackage`) has the package's copy
    bases = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child).__name__ == PerTypeScaleShift.__name__
        and child.out_field == AtomicDataDict.PER_ATOM_ENERGY_KEY
    ]
    if len(bases) != 1:
        raise ValueError(
            f"{BUILDER}: the model `{WHERE}.model` must have exactly one nequip "
            f"PerTypeScaleShift on `{AtomicDataDict.PER_ATOM_ENERGY_KEY}` (the per-type energy "
            f"scale/shift of NequIP and Allegro models); found {len(bases)}"
        )
    # refused before anything is changed
    readout = DatasetReadoutHeads.readout_of(model) if readout_heads else None
    embedding = DatasetTypeEmbedding.embedding_of(model) if fidelity_embedding else None
    table = torch.tensor(_resolve_references(references, datasets, type_names), dtype=torch.float64)
    parent, name, base = bases[0]
    shared = torch.tensor(
        type_values(base, "shifts") or [0.0] * len(type_names), dtype=torch.float64
    )
    wrapper = DatasetEnergyShifts(base, datasets, table - shared, trainable=trainable)
    parent._modules[name] = wrapper.to(base.shifts.device if base.shifts.numel() else "cpu")
    if readout is not None:
        parent, name, module = readout
        parent._modules[name] = DatasetReadoutHeads(module, datasets)
    if embedding is not None:
        parent, name, module = embedding
        parent._modules[name] = DatasetTypeEmbedding(module, datasets).to(
            module.embed_module.weight.device
        )
    add_input_field(model, DATASET_INDEX_KEY)
    return model
