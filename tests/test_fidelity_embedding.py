"""Fidelity-aware trunk layers: ``PerDatasetEnergyReferences(..., fidelity_embedding=True)``
gives each (dataset, atom type) a correction of the NequIP model's atom-type embedding
(``DatasetTypeEmbedding``), which feeds every layer; ``select_fidelity`` folds one dataset's
corrections into nequip's own embedding.

Expected values come from nequip's own model built separately from the same config (the same
seed gives the same weights), from a closed form (the gradient of a loss with respect to a
dataset's correction of type ``t`` is the sum, over that dataset's atoms of type ``t``, of the
loss's gradient with respect to the embedding's output, taken from nequip's model by a hook),
or from running the training model with every frame marked as one dataset. The batch holds
two atom types (its atoms' types are alternated), so that the corrections are per type.
"""

from __future__ import annotations

import copy

import pytest
import torch
from nequip.model import modify

from nequip_mtl.model import DatasetReadoutHeads, DatasetTypeEmbedding, PerDatasetEnergyReferences
from tests import _mfid as F
from tests._mfid import as_dataset, run

DTYPES = ["float32", "float64"]
NAMES = ["lo", "hi"]
TYPES = ("Cu", "Ni")
REFS = {"lo": {"Cu": -2.5, "Ni": -1.0}, "hi": {"Cu": -6.25, "Ni": -5.0}}


def config(dtype="float64", **kw) -> dict:
    return F.model_config(dtype, type_names=TYPES, **kw)


def with_embedding(dtype="float64", heads=False, **kw):
    return PerDatasetEnergyReferences(
        config(dtype, **kw), NAMES, REFS, readout_heads=heads, fidelity_embedding=True
    )


def plain(dtype="float64"):
    """nequip's own model from the same config (no wrapper)."""
    return F.nequip_model(config(dtype))


def embedding(model) -> DatasetTypeEmbedding:
    (found,) = [m for m in model.modules() if isinstance(m, DatasetTypeEmbedding)]
    return found


def type_embed_of(model):
    (found,) = [m for n, m in model.named_modules() if n.endswith("type_embed")]
    return found


def moved_apart(dtype="float64", heads=False, seed=3):
    torch.manual_seed(seed)
    model = with_embedding(dtype, heads)
    with torch.no_grad():
        corrections = embedding(model).corrections
        corrections.add_(0.5 * torch.randn_like(corrections))
    return model


@pytest.fixture(scope="module")
def batch():
    out = F.batch(F.data_module(type_names=TYPES))  # 2 frames of each dataset
    out["atom_types"] = (
        torch.arange(out["atom_types"].numel()).remainder(2).reshape(out["atom_types"].shape)
    )
    return out


def test_at_init_the_model_predicts_exactly_what_it_does_without_it(batch):
    for dtype in DTYPES:
        without = PerDatasetEnergyReferences(config(dtype), NAMES, REFS)
        model = with_embedding(dtype)
        out, ref = run(model, batch), run(without, batch)
        assert torch.equal(out["total_energy"], ref["total_energy"])
        assert torch.equal(out["forces"], ref["forces"])
        corrections = embedding(model).corrections
        assert corrections.shape == (2, 2, 4) and corrections.dtype == getattr(torch, dtype)
        assert not corrections.any()
        # the embedding wrapped is nequip's own, weights included
        assert torch.equal(
            embedding(model).embed.embed_module.weight,
            type_embed_of(plain(dtype)).embed_module.weight,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_datasets_frames_reach_only_their_own_corrections_closed_form(batch, dtype):
    """d(sum of dataset d's frame energies)/d corrections[d, t] = the sum over d's atoms of type
    t of the energy's gradient with respect to the embedding's output (in nequip's own model,
    where the same tensor is ``node_attrs`` and ``node_features``); exactly zero for the other
    dataset's corrections."""
    atom_dataset = batch["dataset_index"][batch["batch"]]
    types = batch["atom_types"].reshape(-1)
    tol = {"float32": 2e-5, "float64": 1e-11}[dtype]
    for d in (0, 1):
        ref = plain(dtype)
        grabbed = {}

        def keep(mod, args, out, grabbed=grabbed):
            out["node_attrs"].retain_grad()
            grabbed["x"] = out["node_attrs"]

        type_embed_of(ref).register_forward_hook(keep)
        energy = run(ref, as_dataset(batch, 0))["total_energy"].reshape(-1)
        energy[batch["dataset_index"] == d].sum().backward()
        expected = torch.stack(
            [grabbed["x"].grad[(atom_dataset == d) & (types == t)].sum(0) for t in (0, 1)]
        )

        model = with_embedding(dtype)
        energy = run(model, batch)["total_energy"].reshape(-1)
        energy[batch["dataset_index"] == d].sum().backward()
        grad = embedding(model).corrections.grad
        torch.testing.assert_close(grad[d], expected, rtol=tol, atol=tol)
        assert grad[d].abs().min() > 1e-6  # every type of d's atoms has a gradient
        assert torch.equal(grad[1 - d], torch.zeros_like(grad[1 - d]))


def test_adam_on_one_datasets_frames_moves_only_its_corrections(batch):
    """Three Adam steps on dataset ``hi``'s energies and forces: its corrections and the shared
    embedding move, ``lo``'s corrections stay exactly zero."""
    model = with_embedding()
    e = embedding(model)
    shared_start = e.embed.embed_module.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    is_hi = batch["dataset_index"] == 1
    atom_hi = is_hi[batch["batch"]]
    for _ in range(3):
        opt.zero_grad()
        out = run(model, batch)
        loss = out["total_energy"].reshape(-1)[is_hi].pow(2).sum()
        loss = loss + out["forces"][atom_hi].pow(2).sum()
        loss.backward()
        opt.step()
    assert not e.corrections[0].any()
    assert e.corrections[1].abs().min() > 1e-4
    assert (e.embed.embed_module.weight.detach() - shared_start).abs().max() > 1e-4


def test_energies_and_forces_of_each_dataset_come_from_its_corrections(batch):
    """With corrections moved apart, a frame's energy and forces depend on its dataset (the
    correction is no energy shift: it passes through every layer) and equal those of the model
    with every frame marked as that dataset."""
    model = moved_apart()
    out = run(model, batch)
    is_hi = (batch["dataset_index"] == 1)[batch["batch"]]
    for d, atoms in ((0, ~is_hi), (1, is_hi)):
        ref = run(model, as_dataset(batch, d))
        torch.testing.assert_close(out["forces"][atoms], ref["forces"][atoms], rtol=0, atol=1e-12)
    lo_forces = run(model, as_dataset(batch, 0))["forces"][is_hi]
    assert (lo_forces - out["forces"][is_hi]).abs().max() > 1e-6


@pytest.mark.parametrize("heads", [False, True], ids=["embedding", "embedding_heads"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fidelity", NAMES)
def test_select_fidelity_folds_the_corrections_into_nequips_embedding(
    batch, dtype, heads, fidelity
):
    model = moved_apart(dtype, heads)
    if heads:
        with torch.no_grad():
            for p in [m for m in model.modules() if isinstance(m, DatasetReadoutHeads)][
                0
            ].heads.parameters():
                p.add_(0.3 * torch.randn_like(p))
    d = NAMES.index(fidelity)
    expected = run(model, as_dataset(batch, d))
    deployed = modify(copy.deepcopy(model), [{"modifier": "select_fidelity", "dataset": fidelity}])
    assert not any(type(m).__module__.startswith("nequip_mtl") for m in deployed.modules())
    got = run(deployed, F.without(batch, "dataset_index"))
    torch.testing.assert_close(got["total_energy"], expected["total_energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-12)
    # nequip's own model: the same classes and parameter names, that dataset's table
    ref = plain(dtype)
    assert list(deployed.state_dict()) == list(ref.state_dict())
    assert type(type_embed_of(deployed)) is type(type_embed_of(ref))
    e = embedding(model)
    table = e.embed.embed_module.weight + e.corrections[d]
    assert torch.equal(type_embed_of(deployed).embed_module.weight, table)
    ref.load_state_dict(deployed.state_dict())
    again = run(ref, F.without(batch, "dataset_index"))
    torch.testing.assert_close(again["total_energy"], got["total_energy"], rtol=0, atol=0)
    # the other fidelity predicts something else: the fold took this dataset's corrections
    other = run(model, as_dataset(batch, 1 - d))
    assert (other["forces"] - got["forces"]).abs().max() > 1e-6


def test_select_fidelity_refuses_an_unknown_name_and_changes_nothing():
    model = with_embedding()
    with pytest.raises(ValueError, match=r"'dft', which is not one of this model's datasets"):
        modify(model, [{"modifier": "select_fidelity", "dataset": "dft"}])
    assert any(isinstance(m, DatasetTypeEmbedding) for m in model.modules())


def test_state_dict_round_trip_restores_the_corrections(batch):
    trained = moved_apart()
    fresh = with_embedding(seed=99)
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
    for d in (0, 1):
        a, b = run(fresh, as_dataset(batch, d)), run(trained, as_dataset(batch, d))
        assert torch.equal(a["total_energy"], b["total_energy"])
        assert torch.equal(a["forces"], b["forces"])
    without = PerDatasetEnergyReferences(config(), NAMES, REFS)
    with pytest.raises(RuntimeError, match=r"corrections"):
        without.load_state_dict(trained.state_dict())


def test_fidelity_embedding_must_be_a_bool():
    with pytest.raises(ValueError, match=r"`training_module.model.fidelity_embedding` must be"):
        PerDatasetEnergyReferences(config(), NAMES, REFS, fidelity_embedding="yes")


def test_a_model_without_a_type_embedding_is_refused_unchanged():
    model = plain()
    (parent,) = [m for m in model.modules() if "type_embed" in m._modules]
    parent._modules["type_embed"] = torch.nn.Identity()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as err:
        PerDatasetEnergyReferences(model, NAMES, REFS, fidelity_embedding=True)
    msg = str(err.value)
    assert "`training_module.model.fidelity_embedding: true`" in msg and "has 0" in msg
    assert "NodeTypeEmbed" in msg and "`training_module.model.fidelity_embedding: false`" in msg
    assert [type(m) for m in model.modules()] == before
