"""The module's logged task-gradient statistics against directly computed values."""

import pytest
import torch

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG, UPGrad
from tests._harness import MemoryLogger, datamodule, module_kwargs, trainer
from tests.test_weights_every import NAMES, StepRecorder


@pytest.mark.parametrize("aggregator", [ConFIG, UPGrad])
def test_logged_norms_cosines_and_weights_equal_direct_values(tmp_path, aggregator):
    torch.manual_seed(0)
    agg = {"_target_": f"nequip_mtl.aggregators.{aggregator.__name__}"}
    module = mtl.MultitaskLightningModule(aggregator=agg, **module_kwargs())
    rec, logger = StepRecorder(aggregator()), MemoryLogger()
    tr = trainer(tmp_path, max_epochs=2, callbacks=[rec], logger=logger, log_every_n_steps=1)
    tr.fit(module, datamodule=datamodule())
    logged = [m for _, m in logger.records if "mtl/grad_norm/forces_mse" in m]
    assert len(logged) == len(rec.rows) == 4
    for metrics, rows, update in zip(logged, rec.rows, rec.updates):
        norms = rows.norm(dim=1)
        cos = (rows @ update) / (norms * update.norm())
        coeffs = torch.tensor([module.loss.entries[n].coeff for n in NAMES]).double()
        weights = aggregator().weights(rows @ rows.T, coeffs)
        for i, name in enumerate(NAMES):
            assert metrics[f"mtl/grad_norm/{name}"] == pytest.approx(float(norms[i]), rel=1e-9)
            assert metrics[f"mtl/cos_update/{name}"] == pytest.approx(float(cos[i]), rel=1e-7)
            assert metrics[f"mtl/weight/{name}"] == pytest.approx(float(weights[i]), rel=1e-7)
        assert metrics["mtl/skipped_steps"] == 0
