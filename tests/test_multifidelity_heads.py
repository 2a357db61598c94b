"""Per-dataset readout heads: ``PerDatasetEnergyReferences(...,
readout_heads=True)`` gives each dataset its own copy of the last linear layer of the NequIP
model's per-atom energy readout (``DatasetReadoutHeads``), and ``select_fidelity`` folds one
copy back into nequip's own readout.

Expected values come from nequip's own model built separately from the same config (the same
seed gives the same weights), from a closed form (the gradient of a frame energy with respect
to the last readout layer is ``alpha * scale * sum of the readout's inputs`` over that frame's
atoms), or from running the training model with every frame marked as one dataset.
"""

from __future__ import annotations

import copy

import pytest
import torch
from nequip.model import modify

from nequip_mtl.model import DatasetEnergyShifts, DatasetReadoutHeads, PerDatasetEnergyReferences
from tests import _mfid as F
from tests._mfid import as_dataset, run

DTYPES = ["float32", "float64"]
NAMES = ["lo", "hi"]
REFS = {"lo": {"Cu": -2.5}, "hi": {"Cu": -6.25}}
#: the readout of NequIPGNNModel: one linear layer (nequip's default), or one hidden layer
DEPTHS = {"linear": {}, "hidden": {"readout_mlp_hidden_layers_depth": 1,
                                   "readout_mlp_hidden_layers_width": 3}}  # fmt: skip


def config(dtype="float64", readout="linear", **kw) -> dict:
    out = F.model_config(dtype, **kw)
    out.update(DEPTHS[readout])
    return out


def with_heads(dtype="float64", readout="linear", trainable=False, **kw):
    return PerDatasetEnergyReferences(
        config(dtype, readout, **kw), NAMES, REFS, trainable=trainable, readout_heads=True
    )


def plain(dtype="float64", readout="linear"):
    """nequip's own model from the same config (no wrapper)."""
    return F.nequip_model(config(dtype, readout))


def heads(model) -> DatasetReadoutHeads:
    (found,) = [m for m in model.modules() if isinstance(m, DatasetReadoutHeads)]
    return found


def readout_of(model):
    """The ``per_atom_energy_readout`` of a plain nequip model."""
    (found,) = [m for n, m in model.named_modules() if n.endswith("per_atom_energy_readout")]
    return found


def frame_energy_of(model, batch, d: int) -> torch.Tensor:
    """The summed energy of the batch's frames of dataset ``d`` (a loss of dataset d only)."""
    energy = run(model, batch)["total_energy"].reshape(-1)
    return energy[batch["dataset_index"] == d].sum()


@pytest.fixture(scope="module")
def batch():
    return F.batch(F.data_module())  # 2 frames of each dataset


# ------------------------------------------------------------------ at initialisation


@pytest.mark.parametrize("readout", list(DEPTHS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_at_init_the_model_predicts_exactly_what_it_does_without_heads(batch, dtype, readout):
    without = PerDatasetEnergyReferences(config(dtype, readout), NAMES, REFS)
    model = with_heads(dtype, readout)
    out, ref = run(model, batch), run(without, batch)
    assert torch.equal(out["total_energy"], ref["total_energy"])
    assert torch.equal(out["forces"], ref["forces"])
    # every head is nequip's own last readout layer, weights included
    last = readout_of(plain(dtype, readout)).mlp_module.mlp[-1]
    assert len(heads(model).heads) == 2
    for head in heads(model).heads:
        assert type(head) is type(last)
        assert torch.equal(head.weight, last.weight) and head.weight.dtype == getattr(torch, dtype)
    # the shared layers are no longer in the readout: one copy per dataset, none shared
    names = [n for n, _ in model.named_parameters() if "per_atom_energy_readout" in n]
    assert sum(".heads." in n for n in names) == 2
    assert len(names) == 2 + (readout == "hidden")


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_datasets_frames_reach_only_their_own_head_closed_form(batch, dtype):
    """d(sum of dataset d's frame energies)/d head_d = alpha * scale * sum of the readout's
    inputs over d's atoms (the readout is one linear layer); exactly zero on the other head.
    The inputs are taken from nequip's own model (same seed) by a forward hook."""
    ref = plain(dtype)
    inputs = {}
    readout_of(ref).register_forward_hook(
        lambda mod, args, out: inputs.update(x=args[0]["node_features"].detach())
    )
    run(ref, batch)
    last = readout_of(ref).mlp_module.mlp[-1]
    atom_dataset = batch["dataset_index"][batch["batch"]]
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for d in (0, 1):
        model = with_heads(dtype)
        frame_energy_of(model, batch, d).backward()
        x = inputs["x"][atom_dataset == d].to(torch.float64)
        expected = float(last.alpha) * 0.5 * x.sum(0, keepdim=True).T  # scale 0.5
        own, other = heads(model).heads[d].weight.grad, heads(model).heads[1 - d].weight.grad
        torch.testing.assert_close(own.double(), expected, rtol=tol, atol=tol)
        assert own.abs().max() > 1e-3
        assert torch.equal(other, torch.zeros_like(other))


def test_adam_on_one_datasets_frames_moves_only_its_head(batch):
    """Three Adam steps on dataset ``hi``'s energies and forces: its head and the shared
    network move, ``lo``'s head stays bit for bit; a step on both datasets then moves both
    heads apart."""
    model = with_heads(readout="hidden")
    h = heads(model)
    start = [p.detach().clone() for p in h.heads.parameters()]
    shared = h.readout.mlp_module.mlp[0].weight
    shared_start = shared.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hi_only = {k: v for k, v in F.clone(batch).items()}
    for _ in range(3):
        opt.zero_grad()
        out = run(model, hi_only)
        is_hi = hi_only["dataset_index"] == 1
        atom_hi = is_hi[hi_only["batch"]]
        loss = out["total_energy"].reshape(-1)[is_hi].pow(2).sum()
        loss = loss + out["forces"][atom_hi].pow(2).sum()
        loss.backward()
        opt.step()
    lo_w, hi_w = (p.detach() for p in h.heads.parameters())
    assert torch.equal(lo_w, start[0])
    assert (hi_w - start[1]).abs().max() > 1e-4
    assert (shared.detach() - shared_start).abs().max() > 1e-4
    # after training the heads differ, and the model no longer predicts what it did
    assert (lo_w - hi_w).abs().max() > 1e-4


@pytest.mark.parametrize("trainable", [False, True], ids=["fixed", "trainable"])
def test_forces_of_each_dataset_come_from_its_head(batch, trainable):
    """After the heads have been moved apart, a frame's forces depend on its dataset (the
    heads are not an energy shift), and equal the forces of the model with every frame
    marked as that dataset."""
    model = with_heads(trainable=trainable)
    with torch.no_grad():
        heads(model).heads[1].weight.mul_(1.5)
    out = run(model, batch)
    is_hi = (batch["dataset_index"] == 1)[batch["batch"]]
    for d, atoms in ((0, ~is_hi), (1, is_hi)):
        ref = run(model, as_dataset(batch, d))
        torch.testing.assert_close(out["forces"][atoms], ref["forces"][atoms], rtol=0, atol=1e-12)
    lo_forces = run(model, as_dataset(batch, 0))["forces"][is_hi]
    assert (lo_forces - out["forces"][is_hi]).abs().max() > 1e-6


# ------------------------------------------------------------------ deployment


def _moved_apart(dtype, readout):
    torch.manual_seed(3)
    model = with_heads(dtype, readout, trainable=True)
    with torch.no_grad():
        for p in heads(model).heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("readout", list(DEPTHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fidelity", NAMES)
def test_select_fidelity_folds_the_head_into_nequips_readout(batch, dtype, readout, fidelity):
    model = _moved_apart(dtype, readout)
    d = NAMES.index(fidelity)
    expected = run(model, as_dataset(batch, d))
    deployed = modify(copy.deepcopy(model), [{"modifier": "select_fidelity", "dataset": fidelity}])
    assert not any(type(m).__module__.startswith("nequip_mtl") for m in deployed.modules())
    got = run(deployed, F.without(batch, "dataset_index"))
    torch.testing.assert_close(got["total_energy"], expected["total_energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-12)
    # nequip's own model: the same classes and parameter names, that dataset's last layer
    ref = plain(dtype, readout)
    assert list(deployed.state_dict()) == list(ref.state_dict())
    folded, own = readout_of(deployed), readout_of(ref)
    assert type(folded) is type(own)
    assert [type(m) for m in folded.modules()] == [type(m) for m in own.modules()]
    assert torch.equal(folded.mlp_module.mlp[-1].weight, heads(model).heads[d].weight)
    # the deployed model loads into nequip's own model and predicts the same
    ref.load_state_dict(deployed.state_dict())
    again = run(ref, F.without(batch, "dataset_index"))
    torch.testing.assert_close(again["total_energy"], got["total_energy"], rtol=0, atol=0)


def test_select_fidelity_refuses_an_unknown_name_and_changes_nothing():
    model = with_heads()
    with pytest.raises(ValueError, match=r"'dft', which is not one of this model's datasets"):
        modify(model, [{"modifier": "select_fidelity", "dataset": "dft"}])
    assert any(isinstance(m, DatasetReadoutHeads) for m in model.modules())
    assert any(isinstance(m, DatasetEnergyShifts) for m in model.modules())


# ------------------------------------------------------------------ restart


def test_state_dict_round_trip_restores_every_head(batch):
    """A model with moved-apart heads saved and loaded into a freshly built one (another
    seed) predicts the same for both datasets; a model without heads refuses the state."""
    trained = _moved_apart("float64", "hidden")
    fresh = with_heads(readout="hidden", trainable=True, seed=99)
    assert not torch.equal(run(fresh, batch)["total_energy"], run(trained, batch)["total_energy"])
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
    for d in (0, 1):
        a, b = run(fresh, as_dataset(batch, d)), run(trained, as_dataset(batch, d))
        assert torch.equal(a["total_energy"], b["total_energy"])
        assert torch.equal(a["forces"], b["forces"])
    without = PerDatasetEnergyReferences(config(readout="hidden"), NAMES, REFS, trainable=True)
    with pytest.raises(RuntimeError, match=r"heads\.0\.weight"):
        without.load_state_dict(trained.state_dict())


# ------------------------------------------------------------------ bad input


def test_readout_heads_must_be_a_bool():
    with pytest.raises(ValueError, match=r"`training_module.model.readout_heads` must be true"):
        PerDatasetEnergyReferences(config(), NAMES, REFS, readout_heads="yes")


class _OtherReadout(torch.nn.Module):
    """A per-atom energy readout that is not nequip's ScalarMLP (as for Allegro, whose
    energies are read out per edge)."""

    def __init__(self, like):
        super().__init__()
        self.linear = torch.nn.Linear(like.mlp_module.dims[0], 1, dtype=torch.float64)
        self.irreps_in, self.irreps_out = like.irreps_in, like.irreps_out

    def forward(self, data):
        data["per_atom_energy"] = self.linear(data["node_features"])
        return data


def test_a_model_without_a_recognisable_readout_is_refused_unchanged():
    model = plain()
    (parent,) = [m for m in model.modules() if "per_atom_energy_readout" in m._modules]
    parent._modules["per_atom_energy_readout"] = _OtherReadout(readout_of(model))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as err:
        PerDatasetEnergyReferences(model, NAMES, REFS, readout_heads=True)
    msg = str(err.value)
    assert "`training_module.model.readout_heads: true`" in msg and "has 0" in msg
    assert "per_atom_energy" in msg and "`training_module.model.readout_heads: false`" in msg
    assert [type(m) for m in model.modules()] == before  # nothing was wrapped
    PerDatasetEnergyReferences(model, NAMES, REFS)  # without heads it is accepted


def test_a_fused_linear_readout_is_refused_naming_the_option():
    """Hidden readout layers without a nonlinearity are one fused product (nequip's
    DeepLinearMLP): no last layer to copy."""
    cfg = config(readout="hidden")
    cfg["readout_mlp_nonlinearity"] = None
    with pytest.raises(ValueError, match=r"DeepLinearMLP, not a torch.nn.Sequential.*"
                       r"readout_mlp_nonlinearity"):  # fmt: skip
        PerDatasetEnergyReferences(cfg, NAMES, REFS, readout_heads=True)
