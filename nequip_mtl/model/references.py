"""Per-dataset energy references: one shared nequip model trained on datasets computed at
different levels of theory, each with its own per-type energy zero.

This module is part of packaged models (``nequip-package`` interns its code), so it imports
only torch and nequip: no Lightning, no Hydra, no ``nequip_mtl.data`` (whose package imports
ASE).
"""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Mapping, Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, PerTypeScaleShift
from nequip.nn.model_modifier_utils import model_modifier, replace_submodules

#: the per-frame field naming a frame's training dataset (the same string as
#: ``nequip_mtl.data.keys.DATASET_INDEX_KEY``, written out here so that packaged models do not
#: import ``nequip_mtl.data``)
DATASET_INDEX_KEY = "dataset_index"

_BUILDER = "PerDatasetEnergyReferences"
_WHERE = "training_module.model"


def _type_values(module: PerTypeScaleShift, name: str) -> list[float] | None:
    """``scales`` / ``shifts`` of nequip's module as one float64 value per type (``None`` when
    the module has none)."""
    values = getattr(module, name).detach().to(torch.float64).reshape(-1).cpu()
    if values.numel() == 0:
        return None
    if values.numel() == 1:
        return [float(values[0])] * module.num_types
    return [float(v) for v in values]


def _require_dataset_index(module: torch.nn.Module, data: AtomicDataDict.Type) -> None:
    if DATASET_INDEX_KEY not in data:
        raise RuntimeError(
            f"{type(module).__name__}: the input has no `{DATASET_INDEX_KEY}`: this model "
            f"predicts at the level of theory of each of its datasets {module.dataset_names}. "
            "Frames from nequip_mtl.data.MultiDatasetDataModule carry it; to use the model "
            "at one dataset's level of theory, deploy it with the model modifier "
            "`select_fidelity` (e.g. `nequip-package modify in.nequip.zip out.nequip.zip "
            "--modifier select_fidelity dataset=<name>`)."
        )


class _DatasetRows(torch.nn.Module):
    """A module with one row of parameters per name in ``dataset_names``, bound to the data
    module's datasets by name.

    A frame's ``dataset_index`` is its dataset's position in the data module; ``dataset_rows``
    (a non-persistent buffer, the identity until bound) maps it to this module's row of the
    dataset of that name, so ``datasets`` may list the data module's datasets in any order.
    """

    def _init_rows(self, dataset_names: Sequence[str]) -> None:
        self.dataset_names = list(dataset_names)
        rows = torch.arange(len(self.dataset_names), dtype=torch.long)
        self.register_buffer("dataset_rows", rows, persistent=False)

    def bind_datasets(self, names: Sequence[str], where: str = _WHERE) -> None:
        """Read the frames of the data module's datasets ``names`` (in ``dataset_index``
        order) with the rows of the same names; refuses a dataset this module has no row for
        (called by the data module at setup)."""
        for name in names:
            if name not in self.dataset_names:
                close = difflib.get_close_matches(name, self.dataset_names, n=1)
                hint = f"; is {close[0]!r} meant to be {name!r}?" if close else ""
                raise ValueError(
                    f"the data module's dataset {name!r} (`data.datasets`) is not one of the "
                    f"datasets {self.dataset_names} of `{where}.datasets` "
                    f"({type(self).__name__}), so its frames have no energy reference or "
                    f"readout head{hint}"
                )
        rows = [self.dataset_names.index(n) for n in names]
        self.dataset_rows = torch.tensor(rows, dtype=torch.long, device=self.dataset_rows.device)

    def _atom_rows(self, data: AtomicDataDict.Type, num_atoms: int) -> torch.Tensor:
        """Each atom's row: that of its frame's dataset."""
        frame_row = self.dataset_rows[data[DATASET_INDEX_KEY].reshape(-1)]
        if AtomicDataDict.BATCH_KEY in data:
            return frame_row[data[AtomicDataDict.BATCH_KEY].reshape(-1)]
        return frame_row.expand(num_atoms)


def _dataset_position(dataset_names: list[str], dataset) -> int:
    if isinstance(dataset, str) and dataset in dataset_names:
        return dataset_names.index(dataset)
    raise ValueError(
        f"select_fidelity: `dataset` is {dataset!r}, which is not one of this model's "
        f"datasets {dataset_names} (the `datasets` of {_BUILDER}, in the data "
        "module's order); name one of them"
    )


class DatasetEnergyShifts(GraphModuleMixin, _DatasetRows):
    """nequip's per-type energy scale and shift of the shared model, plus one per-type energy
    shift per training dataset, chosen for each frame by its ``dataset_index``.

    The per-atom energy of an atom of type ``t`` in a frame of dataset ``d`` is
    ``base(x)[t] + offsets[d, t]``, where ``base`` is the model's own
    ``nequip.nn.PerTypeScaleShift``; ``offsets[d] = references[d] - base.shifts`` (float64,
    like nequip's scale/shift), so that dataset ``d``'s total per-type shift is its own
    reference. A shift that is constant per atom type changes energies only: forces and
    stresses come from the shared network.

    Built by :func:`PerDatasetEnergyReferences`; deployed at one dataset's level of theory by
    the model modifier ``select_fidelity`` (see there).
    """

    def __init__(
        self,
        base: PerTypeScaleShift,
        dataset_names: Sequence[str],
        offsets: torch.Tensor,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self._init_rows(dataset_names)
        self.type_names = list(base.type_names)
        self.field, self.out_field = base.field, base.out_field
        self.trainable = bool(trainable)
        offsets = torch.as_tensor(offsets, dtype=base.out_dtype).reshape(
            len(self.dataset_names), len(self.type_names)
        )
        if self.trainable:
            self.offsets = torch.nn.Parameter(offsets.clone())
        else:
            self.register_buffer("offsets", offsets.clone())
        irreps_in = dict(base.irreps_in)
        irreps_in[DATASET_INDEX_KEY] = None
        self._init_irreps(irreps_in=irreps_in, irreps_out=base.irreps_out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """"""
        _require_dataset_index(self, data)
        data = self.base(data)
        energy = data[self.out_field]
        atom_dataset = self._atom_rows(data, energy.size(0))
        types = data[AtomicDataDict.ATOM_TYPE_KEY].reshape(-1)
        # as nequip's PerTypeScaleShift: only the local atoms of an ML-IAP ghost layout
        atom_dataset, types = atom_dataset[: energy.size(0)], types[: energy.size(0)]
        data[self.out_field] = energy + self.offsets[atom_dataset, types].unsqueeze(-1)
        return data

    def references(self) -> dict[str, dict[str, float]]:
        """Each dataset's total per-type energy shift (the shared shift plus its offset)."""
        shared = _type_values(self.base, "shifts") or [0.0] * len(self.type_names)
        offsets = self.offsets.detach().to(torch.float64).cpu()
        return {
            name: {t: shared[j] + float(offsets[d, j]) for j, t in enumerate(self.type_names)}
            for d, name in enumerate(self.dataset_names)
        }

    def folded(self, dataset: str) -> PerTypeScaleShift:
        """nequip's own ``PerTypeScaleShift`` predicting what this module predicts for the
        frames of ``dataset``: the same scales, and the shared shifts plus that dataset's
        offsets (float64 sums)."""
        d = _dataset_position(self.dataset_names, dataset)
        base = self.base
        shared = _type_values(base, "shifts") or [0.0] * len(self.type_names)
        offsets = self.offsets.detach().to(torch.float64).cpu()[d]
        shifts = (torch.tensor(shared, dtype=torch.float64) + offsets).tolist()
        scales = _type_values(base, "scales")
        if scales is not None and getattr(base, "scales_shortcut", False):
            scales = scales[0]  # keep nequip's single-value form
        elif scales is not None:
            scales = dict(zip(self.type_names, scales))
        # the class of `base` itself: in a loaded package it is the package's copy of nequip's
        cls = type(base)
        new = cls(
            type_names=list(base.type_names),
            field=base.field,
            out_field=base.out_field,
            scales=scales,
            shifts=dict(zip(self.type_names, shifts)),
            scales_trainable=base.scales_trainable,
            shifts_trainable=base.shifts_trainable,
            irreps_in=base.irreps_in,
        )
        return new.to(base.shifts.device if base.shifts.numel() else self.offsets.device)

    @model_modifier(persistent=True, private=False)
    @classmethod
    def select_fidelity(cls, model, dataset: str):
        """Deploy the model at the level of theory of one training dataset.

        The per-dataset energy references are folded into nequip's own per-type energy
        shifts (``shifts[t] + offsets[dataset, t]``, in float64), per-dataset readout heads
        (``readout_heads: true``) into nequip's own readout with that dataset's last layer,
        and ``dataset_index`` is no longer an input: the result is a plain nequip model (the
        same modules and parameter names as the model given to
        ``PerDatasetEnergyReferences``) that predicts exactly what the training model
        predicts for that dataset's frames. Packaged with ``nequip-package``, it loads and
        compiles without ``nequip_mtl`` installed.

        .. code-block:: bash

            nequip-package build best.ckpt multi.nequip.zip
            nequip-package modify multi.nequip.zip dft.nequip.zip \\
                --modifier select_fidelity dataset=dft

        Args:
            dataset: the name of the training dataset whose level of theory to predict
        """
        found = [m for m in model.modules() if isinstance(m, cls)]
        if not found:
            raise RuntimeError(f"select_fidelity: the model has no {cls.__name__} module")
        # refuse an unknown name before changing anything (readout heads, built with the
        # same `datasets`, are checked by these)
        for module in found:
            _dataset_position(module.dataset_names, dataset)
        replace_submodules(model, cls, lambda old: old.folded(dataset))
        replace_submodules(model, DatasetReadoutHeads, lambda old: old.folded(dataset))
        _drop_input_field(model, DATASET_INDEX_KEY)
        return model


def _is_a(module: torch.nn.Module, class_name: str) -> bool:
    """``module`` is an instance of a class named ``class_name`` (by name: a model loaded
    from a package has the package's copy of nequip's classes; a parametrized layer is a
    subclass)."""
    return any(c.__name__ == class_name for c in type(module).__mro__)


class DatasetReadoutHeads(GraphModuleMixin, _DatasetRows):
    """One copy per training dataset of the last linear layer of the model's per-atom
    energy readout (nequip's ``ScalarMLP`` on ``per_atom_energy``), chosen for each atom by
    its frame's ``dataset_index``; the layers before it are shared.

    Each copy starts equal to the model's own last layer, so a model with heads predicts at
    initialisation exactly what it predicts without them; each dataset's frames then train
    only their own copy. Built by :func:`PerDatasetEnergyReferences` with
    ``readout_heads: true``; ``select_fidelity`` folds one copy back into nequip's readout
    (:meth:`folded`).

    Args:
        readout: the model's ``ScalarMLP`` readout (its ``mlp_module.mlp`` a
            ``torch.nn.Sequential`` ending in a ``ScalarLinearLayer``)
        dataset_names: the training datasets, in ``dataset_index`` order
    """

    def __init__(self, readout: torch.nn.Module, dataset_names: Sequence[str]) -> None:
        super().__init__()
        self._init_rows(dataset_names)
        layers = readout.mlp_module.mlp
        last = layers[-1]
        # the shared layers stay in `readout`; its last layer is taken out (an identity)
        self.heads = torch.nn.ModuleList(copy.deepcopy(last) for _ in self.dataset_names)
        layers[-1] = torch.nn.Identity()
        self.readout = readout
        self.field, self.out_field = readout.field, readout.out_field
        irreps_in = dict(readout.irreps_in)
        irreps_in[DATASET_INDEX_KEY] = None
        self._init_irreps(irreps_in=irreps_in, irreps_out=readout.irreps_out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """"""
        _require_dataset_index(self, data)
        hidden = self.readout.mlp_module(data[self.field])
        atom_dataset = self._atom_rows(data, hidden.size(0)).unsqueeze(-1)
        out = self.heads[0](hidden)
        for d in range(1, len(self.heads)):
            out = torch.where(atom_dataset == d, self.heads[d](hidden), out)
        data[self.out_field] = out
        return data

    def folded(self, dataset: str) -> torch.nn.Module:
        """The model's own readout (its class, its shared layers) with ``dataset``'s last
        layer: nequip's readout predicting what this module predicts for that dataset."""
        d = _dataset_position(self.dataset_names, dataset)
        readout = copy.deepcopy(self.readout)
        readout.mlp_module.mlp[-1] = copy.deepcopy(self.heads[d])
        return readout

    @classmethod
    def readout_of(cls, model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module]:
        """``(parent, name, readout)`` of the one per-atom energy readout of ``model`` whose
        last linear layer can be copied per dataset; refused with the reason otherwise."""
        where = f"{_WHERE}.readout_heads"
        found = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if _is_a(child, "ScalarMLP")
            and getattr(child, "out_field", None) == AtomicDataDict.PER_ATOM_ENERGY_KEY
        ]
        if len(found) != 1:
            raise ValueError(
                f"{_BUILDER}: `{where}: true` needs the model's per-atom energy readout, one "
                f"nequip ScalarMLP writing `{AtomicDataDict.PER_ATOM_ENERGY_KEY}` (NequIP "
                f"models' `per_atom_energy_readout`); the model `{_WHERE}.model` has "
                f"{len(found)}. Models without one (e.g. Allegro, whose energies are read out "
                f"per edge) are not supported: set `{where}: false`"
            )
        layers = getattr(found[0][2].mlp_module, "mlp", None)
        if not (isinstance(layers, torch.nn.Sequential) and _is_a(layers[-1], "ScalarLinearLayer")):
            raise ValueError(
                f"{_BUILDER}: `{where}: true`: the readout's layers are "
                f"{type(layers).__name__}, not a torch.nn.Sequential ending in nequip's "
                "ScalarLinearLayer (a readout with hidden layers and no nonlinearity is one "
                "fused matrix product, which has no last layer to copy): give the readout a "
                f"nonlinearity (`readout_mlp_nonlinearity`) or set `{where}: false`"
            )
        return found[0]


def _builder(target: str):
    """The function a ``_target_`` names (as nequip's own model loading does, without Hydra,
    which packaged code must not import)."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{_BUILDER}: `{_WHERE}.model._target_` is `{target}`, which is not an importable "
            f"model builder ({err})"
        ) from err


def _graph_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "is_graph_model", False)]


def _add_input_field(model: torch.nn.Module, key: str) -> None:
    """Let nequip's ``GraphModel`` pass ``key`` through to the wrapped model (it keeps only
    the fields in ``model_input_fields``)."""
    for graph_model in _graph_models(model):
        graph_model.irreps_in[key] = None
        if key not in graph_model.model_input_fields:
            graph_model.model_input_fields.append(key)
        graph_model.model.irreps_in[key] = None


def _drop_input_field(model: torch.nn.Module, key: str) -> None:
    for graph_model in _graph_models(model):
        graph_model.irreps_in.pop(key, None)
        if key in graph_model.model_input_fields:
            graph_model.model_input_fields.remove(key)
        graph_model.model.irreps_in.pop(key, None)


def _merge_references(references, where: str) -> dict[str, dict]:
    """``references`` is one mapping ``{dataset: {type: value}}`` or a list of them, later
    values replacing earlier ones."""
    layers = references if isinstance(references, (list, tuple)) else [references]
    merged: dict[str, dict] = {}
    for k, layer in enumerate(layers):
        at = f"{where}[{k}]" if isinstance(references, (list, tuple)) else where
        if not isinstance(layer, Mapping):
            raise ValueError(
                f"{_BUILDER}: `{at}` must map dataset names to {{type: energy}} mappings, got "
                f"{type(layer).__name__}"
            )
        for dataset, values in layer.items():
            if not isinstance(values, Mapping):
                raise ValueError(
                    f"{_BUILDER}: `{at}.{dataset}` must map type names to energies, got "
                    f"{type(values).__name__}"
                )
            merged.setdefault(dataset, {}).update(values)
    return merged


def _resolve_references(
    references, datasets: list[str], type_names: list[str]
) -> list[list[float]]:
    where = f"{_WHERE}.references"
    merged = _merge_references(references, where)
    unknown = [d for d in merged if d not in datasets]
    if unknown:
        raise ValueError(
            f"{_BUILDER}: `{where}` names dataset(s) {unknown} that are not in `{_WHERE}."
            f"datasets` {datasets}"
        )
    table = []
    for dataset in datasets:
        values = merged.get(dataset, {})
        foreign = [t for t in values if t not in type_names]
        if foreign:
            raise ValueError(
                f"{_BUILDER}: `{where}.{dataset}` has type(s) {foreign} that are not in the "
                f"model's type_names {type_names}: a dataset's species must all be model types "
                "(add them to the model's `type_names` and the data's "
                "`chemical_species_to_atom_type_map`)"
            )
        missing = [t for t in type_names if values.get(t) is None]
        if missing:
            example = ", ".join(f"{t}: <energy>" for t in missing)
            raise ValueError(
                f"{_BUILDER}: no energy reference for type(s) {missing} of dataset "
                f"`{dataset}`: no training frame of `{dataset}` holds them, so they cannot be "
                "fitted from its data. Set them by hand, e.g. the isolated-atom energies at "
                f"that level of theory, by giving `{where}` as a list whose later entries "
                f"replace earlier ones: [${{training_data_stats:per_dataset_energy_references}}, "
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
    """
    if isinstance(model, Mapping):
        config = dict(model)
        if "_target_" not in config:
            raise ValueError(f"{_BUILDER}: `{_WHERE}.model` needs a `_target_` (a model builder)")
        model = _builder(config.pop("_target_"))(**config)
    datasets = list(datasets) if not isinstance(datasets, str) else [datasets]
    if not datasets or len(set(datasets)) != len(datasets):
        raise ValueError(
            f"{_BUILDER}: `{_WHERE}.datasets` must list the data module's datasets, "
            f"each once; got {datasets}"
        )
    for key, value in (("trainable", trainable), ("readout_heads", readout_heads)):
        if not isinstance(value, bool):
            raise ValueError(f"{_BUILDER}: `{_WHERE}.{key}` must be true or false, got {value!r}")
    graph_models = _graph_models(model)
    if not graph_models:
        raise ValueError(f"{_BUILDER}: `{_WHERE}.model` did not build a nequip GraphModel")
    type_names = list(graph_models[0].type_names)
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
            f"{_BUILDER}: the model `{_WHERE}.model` must have exactly one nequip "
            f"PerTypeScaleShift on `{AtomicDataDict.PER_ATOM_ENERGY_KEY}` (the per-type energy "
            f"scale/shift of NequIP and Allegro models); found {len(bases)}"
        )
    # refused before anything is changed
    readout = DatasetReadoutHeads.readout_of(model) if readout_heads else None
    table = torch.tensor(_resolve_references(references, datasets, type_names), dtype=torch.float64)
    parent, name, base = bases[0]
    shared = torch.tensor(
        _type_values(base, "shifts") or [0.0] * len(type_names), dtype=torch.float64
    )
    wrapper = DatasetEnergyShifts(base, datasets, table - shared, trainable=trainable)
    parent._modules[name] = wrapper.to(base.shifts.device if base.shifts.numel() else "cpu")
    if readout is not None:
        parent, name, module = readout
        parent._modules[name] = DatasetReadoutHeads(module, datasets)
    _add_input_field(model, DATASET_INDEX_KEY)
    return model
