"""Deliberate differences from nequip 0.19 (docs/differences.md), shown side by side.

The ConFIG case: nequip's ``ConFIGLightningModule`` solves ``A x = b`` with
``torch.linalg.lstsq(A, b)``, whose default CPU driver (``gelsy``, QR with column
pivoting) returns ``x = 0`` when the *first* column of ``A`` is all zero. The first
column is the first element of the model's first parameter, the type embedding of the
first type; a batch without atoms of that type gives exactly that, and nequip applies a
zero update. Ours gives the minimum-norm solution (the update nequip's own ``lsqr=False``
path computes with ``pinv``).
"""

from __future__ import annotations

import nequip.train
import torch
from nequip.data.datamodule import NequIPDataModule

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG
from tests._harness import model_config, module_kwargs, params, trainer

# ---------------------------------------------------------------- the solve alone


def _zero_first_column(m: int = 3, n: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    A[:, 0] = 0.0
    return A


def test_lstsq_default_driver_returns_zero_for_a_zero_first_column():
    """The minimal repro of docs/differences.md: ``gelsy`` gives x = 0, ``gelsd`` and
    ``pinv`` the minimum-norm solution (A has full row rank, so A x = b exactly)."""
    A = _zero_first_column()
    b = torch.ones(3, dtype=torch.float64)
    x_default = torch.linalg.lstsq(A, b).solution  # what nequip calls
    x_gelsy = torch.linalg.lstsq(A, b, driver="gelsy").solution
    x_gelsd = torch.linalg.lstsq(A, b, driver="gelsd").solution
    x_pinv = torch.linalg.pinv(A) @ b
    assert torch.count_nonzero(x_default) == 0 and torch.count_nonzero(x_gelsy) == 0
    torch.testing.assert_close(x_gelsd, x_pinv, rtol=0, atol=1e-14)
    torch.testing.assert_close(A @ x_pinv, b, rtol=0, atol=1e-13)
    # the zero column anywhere else is harmless, also for gelsy
    B = A.roll(5, dims=1)
    torch.testing.assert_close(
        torch.linalg.lstsq(B, b).solution, torch.linalg.pinv(B) @ b, rtol=0, atol=1e-13
    )


def _nequip_config_update(grads: torch.Tensor, coeffs: torch.Tensor, lsqr: bool) -> torch.Tensor:
    """The update of ``nequip.train.ConFIGLightningModule._ConFIG_backwards`` (lines
    "construct normalized gradient matrix" to "construct the gradient vector"), on a
    given gradient matrix. Kept verbatim; the module-level test below runs nequip's own
    code."""
    eps = 1e-8
    A = torch.nn.functional.normalize(grads, dim=1, eps=eps)
    b = torch.nn.functional.normalize(coeffs.to(A.dtype), dim=0, eps=eps)
    x = torch.linalg.lstsq(A, b).solution if lsqr else torch.linalg.pinv(A) @ b
    x = torch.nn.functional.normalize(x, dim=0, eps=eps)
    return torch.sum(grads * x) * x


def test_aggregator_matches_pinv_where_nequips_lstsq_gives_zero():
    grads = _zero_first_column()
    grads[1] *= 30.0  # very different norms, as energy vs forces
    coeffs = torch.ones(3, dtype=torch.float64)
    theirs = _nequip_config_update(grads, coeffs, lsqr=True)
    theirs_pinv = _nequip_config_update(grads, coeffs, lsqr=False)
    ours = ConFIG(lsqr=True)(grads, coeffs)
    ours_pinv = ConFIG(lsqr=False)(grads, coeffs)
    assert torch.count_nonzero(theirs) == 0
    torch.testing.assert_close(ours, theirs_pinv, rtol=0, atol=1e-13)
    torch.testing.assert_close(ours_pinv, theirs_pinv, rtol=0, atol=1e-13)
    cos = torch.nn.functional.cosine_similarity(grads, ours[None], dim=1)
    torch.testing.assert_close(cos, cos[0].expand(3), rtol=0, atol=1e-14)
    assert cos[0] > 0


# ---------------------------------------------------------------- real modules


def _two_species_kwargs(**overrides) -> dict:
    model = model_config()
    model.update(
        type_names=["Cu", "Ni"],
        per_type_energy_shifts={"Cu": -3.0, "Ni": -4.0},
        per_type_energy_scales={"Cu": 0.5, "Ni": 0.6},
    )
    return module_kwargs(model=model, **overrides)


def _single_element_data(element: str) -> NequIPDataModule:
    """Frames of one element, typed for a Cu/Ni model; one frame per batch."""
    return NequIPDataModule(
        seed=1,
        split_dataset={
            "dataset": {
                "_target_": "nequip.data.dataset.EMTTestDataset",
                "transforms": [
                    {
                        "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                        "model_type_names": ["Cu", "Ni"],
                        "chemical_species_to_atom_type_map": {"Cu": "Cu", "Ni": "Ni"},
                    },
                    {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.0},
                ],
                "supercell": [2, 2, 2],
                "seed": 1,
                "num_frames": 2,
                "element": element,
            },
            "train": 1,
            "val": 1,
        },
        train_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": 1},
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": 1},
    )


def _step(module_cls, tmp_path, element: str, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights before, weights after) one SGD step on one frame of ``element``."""
    torch.manual_seed(0)
    module = module_cls(**_two_species_kwargs(**overrides))
    first = next(module.model.parameters())
    assert first.shape == (2, 4)  # the type embedding; its row 0 (Cu) comes first
    before = params(module)
    data = _single_element_data(element)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    return before, params(module)


def test_nequip_config_module_applies_a_zero_update_ours_does_not(tmp_path):
    """Real modules, same model, same Ni-only frame, one SGD step: nequip's ConFIG with
    its default ``lsqr: true`` does not move the weights; its ``lsqr: false`` (``pinv``)
    does, and ours with ``lsqr: true`` makes exactly that step."""
    theirs_cls, ours_cls = nequip.train.ConFIGLightningModule, mtl.ConFIGLightningModule
    start, theirs = _step(theirs_cls, tmp_path / "a", "Ni")
    _, theirs_pinv = _step(theirs_cls, tmp_path / "b", "Ni", lsqr=False)
    _, ours = _step(ours_cls, tmp_path / "c", "Ni")
    torch.testing.assert_close(theirs, start, rtol=0, atol=0)
    assert (theirs_pinv - start).abs().max() > 1e-5
    torch.testing.assert_close(ours - start, theirs_pinv - start, rtol=0, atol=1e-12)


def test_with_the_first_type_present_both_agree(tmp_path):
    """Control: the same step on a Cu frame (the first column is not zero): nequip's
    default path and ours make the same, nonzero step."""
    start, theirs = _step(nequip.train.ConFIGLightningModule, tmp_path / "a", "Cu")
    _, ours = _step(mtl.ConFIGLightningModule, tmp_path / "b", "Cu")
    assert (theirs - start).abs().max() > 1e-5
    torch.testing.assert_close(ours - start, theirs - start, rtol=0, atol=1e-12)
