"""Bad configuration is rejected at construction; numerical faults never corrupt weights."""

import pytest
import torch

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG
from nequip_mtl.step import SkippedStepsError
from tests._harness import datamodule, fit, module_kwargs, params
from tests._harness import trainer as harness_trainer


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"aggregator": {"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}},
            "not a nequip_mtl.aggregators.Aggregator",
        ),
        ({"aggregator": "ConFIG"}, "must be a dict with a `_target_`"),
        ({"on_nonfinite": "ignore"}, "`on_nonfinite` must be one of"),
        ({"gradient_clip_val": -1.0}, "`gradient_clip_val` must be a number > 0"),
        (
            {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "l2"},
            "`gradient_clip_algorithm` must be one of",
        ),
        ({"gradient_clip_algorithm": "norm"}, "`gradient_clip_val` is not"),
    ],
)
def test_bad_module_config_is_rejected_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mtl.MultitaskLightningModule(**module_kwargs(**kwargs))


def test_named_config_module_takes_no_aggregator():
    with pytest.raises(ValueError, match="always uses ConFIG"):
        mtl.ConFIGLightningModule(
            **module_kwargs(aggregator={"_target_": "nequip_mtl.aggregators.ConFIG"})
        )


def test_config_module_arguments_reach_the_aggregator():
    module = mtl.ConFIGLightningModule(lsqr=False, norm_eps=1e-6, **module_kwargs())
    assert isinstance(module.aggregator, ConFIG)
    assert (module.aggregator.lsqr, module.aggregator.norm_eps) == (False, 1e-6)


class StressFault(mtl.ConFIGLightningModule):
    """Replaces the stress labels of the training batches with NaN (or +inf), on every
    step or only from optimizer step ``fault_from`` on."""

    fault_value = float("nan")
    fault_from = 0

    def process_target(self, batch, batch_idx, dataloader_idx=0):
        target = super().process_target(batch, batch_idx, dataloader_idx)
        if self.training and self.trainer.global_step >= self.fault_from:
            target["stress"] = torch.full_like(target["stress"], self.fault_value)
        return target


class LateStressFault(StressFault):
    fault_from = 2  # the first epoch (2 steps) trains, every later step is faulty


class InfStressFault(LateStressFault):
    fault_value = float("inf")


@pytest.mark.parametrize("cls, kind", [(LateStressFault, "NaN"), (InfStressFault, "(NaN|inf)")])
def test_nonfinite_task_gradient_skips_the_step(tmp_path, cls, kind):
    reference, _ = fit(mtl.ConFIGLightningModule, tmp_path / "c", max_epochs=1)
    with pytest.warns(RuntimeWarning, match=f"'stress_mse' has an? {kind} gradient"):
        module, tr = fit(cls, tmp_path / "a", max_epochs=3, on_nonfinite="skip")
    assert module.skipped_steps == 4 and module.faults.applied == 2
    assert tr.callback_metrics["mtl/skipped_steps"] == 4
    # the skipped steps changed nothing: the weights are those after the first epoch
    torch.testing.assert_close(params(module), params(reference), rtol=0, atol=0)


def test_a_run_that_never_trains_stops_with_the_cause(tmp_path):
    """Every step of the first epoch skipped: an error naming the component, before
    validation could checkpoint the untrained model."""
    start, _ = fit(StressFault, tmp_path / "s", max_epochs=0)
    module = StressFault(**module_kwargs())
    with pytest.raises(SkippedStepsError, match="first epoch was skipped.*'stress_mse' has a NaN"):
        with pytest.warns(RuntimeWarning, match="'stress_mse' has a NaN gradient"):
            harness_trainer(tmp_path / "a", max_epochs=3).fit(module, datamodule=datamodule())
    assert module.skipped_steps == 2 and module.faults.applied == 0
    torch.testing.assert_close(params(module), params(start), rtol=0, atol=0)


def test_consecutive_skips_stop_the_run(tmp_path):
    with pytest.raises(SkippedStepsError) as err:
        with pytest.warns(RuntimeWarning, match="'stress_mse' has a NaN gradient"):
            fit(LateStressFault, tmp_path, max_epochs=5, max_consecutive_skips=3)
    msg = str(err.value)
    assert "3 consecutive optimizer steps were skipped" in msg
    assert "max_consecutive_skips=3" in msg and "3 skipped and 2 applied" in msg
    assert "'stress_mse' has a NaN gradient at global step 2" in msg


def test_no_skip_limit_with_null(tmp_path):
    with pytest.warns(RuntimeWarning, match="skipping an optimizer step"):
        module, _ = fit(LateStressFault, tmp_path, max_epochs=4, max_consecutive_skips=None)
    assert module.skipped_steps == 6


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "10"])
def test_bad_skip_limit(value):
    with pytest.raises(ValueError, match="`max_consecutive_skips` must be an integer >= 1 or null"):
        mtl.ConFIGLightningModule(max_consecutive_skips=value, **module_kwargs())


def test_nonfinite_task_gradient_zero_task_drops_only_that_task(tmp_path):
    with pytest.warns(RuntimeWarning, match="on_nonfinite=zero_task"):
        faulty, _ = fit(StressFault, tmp_path / "a", on_nonfinite="zero_task")
    loss = {
        "_target_": "nequip.train.EnergyForceStressLoss",
        "coeffs": {"total_energy": 1.0, "forces": 1.0, "stress": None},
    }
    reference, _ = fit(mtl.ConFIGLightningModule, tmp_path / "b", loss=loss)
    assert faulty.skipped_steps == 0
    torch.testing.assert_close(params(faulty), params(reference), rtol=0, atol=1e-12)


def test_nonfinite_task_gradient_raise(tmp_path):
    with pytest.raises(FloatingPointError, match="stress_mse"):
        fit(StressFault, tmp_path, on_nonfinite="raise")


def test_task_without_labels_in_batch_is_left_out(tmp_path):
    """Stress masked with ignore_nan and absent from every batch: a zero gradient row."""
    loss = {
        "_target_": "nequip.train.MetricsManager",
        "metrics": [
            {
                "name": "forces_mse",
                "field": "forces",
                "coeff": 1.0,
                "metric": {"_target_": "nequip.train.MeanSquaredError"},
            },
            {
                "name": "energy_mse",
                "field": {"_target_": "nequip.data.PerAtomModifier", "field": "total_energy"},
                "coeff": 1.0,
                "metric": {"_target_": "nequip.train.MeanSquaredError"},
            },
            {
                "name": "stress_mse",
                "field": "stress",
                "coeff": 1.0,
                "ignore_nan": True,
                "metric": {"_target_": "nequip.train.MeanSquaredError"},
            },
        ],
    }
    with pytest.warns(RuntimeWarning, match="zero gradient"):
        masked, _ = fit(StressFault, tmp_path / "a", loss=loss)
    assert masked.skipped_steps == 0
    assert set(masked.applied_task_weights) == {"forces_mse", "energy_mse"}
    # every drop is counted and logged, not only warned about once
    assert masked.faults.dropped == {"stress_mse": 2}
    assert masked.trainer.callback_metrics["mtl/dropped/stress_mse"] == 2
    loss["metrics"][2]["coeff"] = None
    reference, _ = fit(mtl.ConFIGLightningModule, tmp_path / "b", loss=loss)
    torch.testing.assert_close(params(masked), params(reference), rtol=0, atol=1e-12)


def test_all_coefficients_null_is_an_error(tmp_path):
    loss = {
        "_target_": "nequip.train.EnergyForceStressLoss",
        "coeffs": {"total_energy": 1.0, "forces": 1.0, "stress": 1.0},
    }
    module = mtl.ConFIGLightningModule(**module_kwargs(loss=loss))
    module.loss.set_coeffs({})  # nequip semantics: everything null
    from tests._harness import trainer

    with pytest.raises(RuntimeError, match="At least one loss component"):
        trainer(tmp_path).fit(module, datamodule=datamodule())


def test_sharded_strategies_are_rejected():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
    from nequip.train import SimpleDDPStrategy

    from nequip_mtl.train.trainer_checks import check_strategy

    for ok in (SingleDeviceStrategy("cpu"), DDPStrategy(), SimpleDDPStrategy()):
        check_strategy(ok)
    with pytest.raises(ValueError, match="`trainer.strategy`=FSDPStrategy is not supported"):
        check_strategy(FSDPStrategy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lsqr": "yes"}, "`lsqr` must be a bool"),
        ({"norm_eps": 0.0}, "`norm_eps` must be > 0"),
        ({"rtol": 1.0}, r"`rtol` must be in \[0, 1\)"),
    ],
)
def test_config_aggregator_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ConFIG(**kwargs)
