"""``CalibrateLossCoefficients`` on a per-dataset loss: ``datasets: within`` balances the
components of each dataset and keeps the datasets' configured shares; ``across`` applies
the rule to every (dataset, component) part at once.

Both runs measure the same gradients (calibration trains the configured weighted sum, the
same trajectory), so ``within``'s coefficients must equal ``across``'s rescaled per
dataset to the configured shares, computed here independently.
"""

from __future__ import annotations

import pytest
import torch
from nequip.train import NequIPLightningModule

from nequip_mtl.train.callbacks import CalibrateLossCoefficients
from tests._harness import multi, trainer
from tests.test_dataset_tasks import BALANCED, COEFFS, kwargs


def calibrated(tmp_path, datasets: str) -> dict[str, float]:
    torch.manual_seed(0)
    module = NequIPLightningModule(**kwargs())
    cb = CalibrateLossCoefficients(rule="gradnorm", steps=3, datasets=datasets)
    tr = trainer(tmp_path, max_epochs=2, callbacks=[cb], limit_val_batches=0)
    tr.fit(module, datamodule=multi(sampling=BALANCED))
    assert cb.done
    return dict(cb.coefficients)


def test_within_keeps_each_datasets_configured_share(tmp_path):
    across = calibrated(tmp_path / "across", "across")
    within = calibrated(tmp_path / "within", "within")
    configured = {f"{d}/{'per_atom_energy_mse' if k == 'total_energy' else 'forces_mse'}": v
                  for d in ("a", "b") for k, v in COEFFS[d].items()}  # fmt: skip
    total = sum(configured.values())
    expected = {}
    for d in ("a", "b"):
        names = [n for n in across if n.startswith(f"{d}/")]
        share = sum(configured[n] for n in names) / total
        scale = share / sum(across[n] for n in names)
        expected.update({n: across[n] * scale for n in names})
    assert within == pytest.approx(expected, rel=1e-10)
    shares = {d: sum(v for n, v in across.items() if n.startswith(f"{d}/")) for d in "ab"}
    assert shares["a"] != pytest.approx(0.5, rel=1e-3)  # across does move the datasets


def test_an_unknown_datasets_setting_is_refused():
    with pytest.raises(ValueError, match="CalibrateLossCoefficients.datasets"):
        CalibrateLossCoefficients(rule="gradnorm", steps=3, datasets="per_dataset")
