"""Every bad callback config fails before the first training step, with a message that
names the config key, the value and what is allowed."""

from __future__ import annotations

import pytest

import nequip_mtl.train.callbacks as mcb
from nequip_mtl.train import UncertaintyWeightingLightningModule
from tests._harness import CoeffRecorder, nequip_fit

LINEAR_FINAL = {"forces_mse": 2.0}


@pytest.mark.parametrize(
    "factory, exc, match",
    [
        (
            lambda: mcb.LossCoefficientScheduler({1: {"forces_mse": 1.0}}, interval="step"),
            ValueError,
            r"LossCoefficientScheduler.interval.*\['epoch', 'batch'\].*'step'",
        ),
        (
            lambda: mcb.LossCoefficientScheduler({-1: {"forces_mse": 1.0}}),
            ValueError,
            r"key -1 must be an integer epoch >= 0",
        ),
        (
            lambda: mcb.LossCoefficientScheduler({"ten": {"forces_mse": 1.0}}),
            ValueError,
            r"key 'ten'",
        ),
        (lambda: mcb.LossCoefficientScheduler({2.5: {"forces_mse": 1.0}}), ValueError, r"key 2.5"),
        (lambda: mcb.LossCoefficientScheduler({}), ValueError, r"non-empty mapping"),
        (
            lambda: mcb.LossCoefficientScheduler({3: {"forces_mse": -2.0}}),
            ValueError,
            r"schedule\[3\].*'forces_mse'.*finite and >= 0.*-2.0",
        ),
        (
            lambda: mcb.LossCoefficientScheduler({3: {"forces_mse": float("nan")}}),
            ValueError,
            r"schedule\[3\].*finite",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler(LINEAR_FINAL, transition_epochs=0),
            ValueError,
            r"transition_epochs.*>= 1.*0",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler(
                LINEAR_FINAL, transition_epochs=2, start_epoch=-1
            ),
            ValueError,
            r"start_epoch.*>= 0.*-1",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler(
                LINEAR_FINAL, transition_epochs=2, shape="exp"
            ),
            ValueError,
            r"shape.*\['linear', 'cosine'\].*'exp'",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler(
                LINEAR_FINAL, interval="batch", start_step=3
            ),
            ValueError,
            r"transition_steps.*required",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler(
                LINEAR_FINAL, transition_epochs=3, interval="batch"
            ),
            ValueError,
            r"start_epoch.*interval: epoch",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler({"forces_mse": None}, transition_epochs=3),
            ValueError,
            r"null",
        ),
        (
            lambda: mcb.LinearLossCoefficientScheduler({"forces_mse": -1.0}, transition_epochs=3),
            ValueError,
            r"finite and >= 0",
        ),
        (
            lambda: mcb.LossCoefficientMonitor(interval="epochs", frequency=1),
            ValueError,
            r"LossCoefficientMonitor.interval",
        ),
        (
            lambda: mcb.LossCoefficientMonitor(interval="epoch", frequency=0),
            ValueError,
            r"LossCoefficientMonitor.frequency.*>= 1.*0",
        ),
        (
            lambda: mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=0),
            ValueError,
            r"SoftAdapt.frequency.*>= 1",
        ),
        (
            lambda: mcb.SoftAdapt(beta=1.1, interval="step", frequency=1),
            ValueError,
            r"SoftAdapt.interval",
        ),
        (
            lambda: mcb.SoftAdapt(beta=float("nan"), interval="epoch", frequency=1),
            ValueError,
            r"SoftAdapt.beta.*finite",
        ),
        (
            lambda: mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=1, variant="l1"),
            ValueError,
            r"SoftAdapt.variant.*'l2_normalized'",
        ),
        (
            lambda: mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=1, scale_by="user"),
            ValueError,
            r"SoftAdapt.scale_by.*'initial', 'current', 'none'",
        ),
        (
            lambda: mcb.DynamicWeightAverage(temperature=0.0),
            ValueError,
            r"DynamicWeightAverage.temperature.*> 0",
        ),
        (
            lambda: mcb.RandomLossWeighting(scale_by="current"),
            ValueError,
            r"RandomLossWeighting.scale_by",
        ),
        (
            lambda: mcb.RandomLossWeighting(distribution="beta"),
            ValueError,
            r"RandomLossWeighting.distribution.*'normal'",
        ),
    ],
)
def test_bad_config_fails_at_construction(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


@pytest.mark.parametrize(
    "callbacks, match",
    [
        # a typo in an entry far in the future is caught before the first step
        (
            lambda: [mcb.LossCoefficientScheduler({500: {"force_mse": 1.0}})],
            r"schedule\[500\].*unknown loss component 'force_mse'.*forces_mse",
        ),
        (
            lambda: [
                mcb.LossCoefficientScheduler(
                    {
                        300: {"stress_mse": None},
                        500: {"forces_mse": None, "per_atom_energy_mse": None},
                    }
                )
            ],
            r"schedule\[500\].*at least one loss coefficient must be positive",
        ),
        (
            lambda: [
                mcb.LinearLossCoefficientScheduler(
                    {"force_mse": 1.0}, transition_epochs=5, start_epoch=100
                )
            ],
            r"final_coeffs.*'force_mse'.*valid names",
        ),
        (
            lambda: [
                mcb.LinearLossCoefficientScheduler(
                    {"forces_mse": 2.0}, transition_epochs=10, start_epoch=0
                ),
                mcb.LinearLossCoefficientScheduler(
                    {"forces_mse": 1.0}, transition_epochs=10, start_epoch=5
                ),
            ],
            r"windows overlap",
        ),
        (
            lambda: [
                mcb.SoftAdapt(beta=1.0, interval="epoch", frequency=1),
                mcb.DynamicWeightAverage(),
            ],
            r"only one adaptive loss-weighting callback",
        ),
    ],
)
def test_bad_config_fails_before_first_step(tmp_path, callbacks, match):
    rec = CoeffRecorder()
    with pytest.raises(ValueError, match=match):
        nequip_fit(tmp_path, [*callbacks(), rec], max_epochs=1)
    assert rec.records == []


def test_coefficient_callbacks_refused_on_modules_that_ignore_coefficients(tmp_path):
    rec = CoeffRecorder()
    with pytest.raises(
        ValueError, match="SoftAdapt changes loss coefficients.*UncertaintyWeightingLightningModule"
    ):
        nequip_fit(
            tmp_path,
            [mcb.SoftAdapt(beta=1.0, interval="epoch", frequency=1), rec],
            module_cls=UncertaintyWeightingLightningModule,
            max_epochs=1,
        )
    assert rec.records == []


# ------------------------------------------------------------------ docstring YAML examples


def _yaml_blocks(obj) -> list[str]:
    import textwrap

    doc = obj.__doc__
    blocks = []
    for part in doc.split(".. code-block:: yaml")[1:]:
        lines = part.splitlines()[1:]
        body = []
        for line in lines:
            if line.strip() and not line.startswith("        "):
                break
            body.append(line)
        blocks.append(textwrap.dedent("\n".join(body)))
    assert blocks, f"{obj.__name__} has no YAML example"
    return blocks


@pytest.mark.parametrize("name", mcb.__all__)
def test_callback_docstring_yaml_instantiates(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cls = getattr(mcb, name)
    for block in _yaml_blocks(cls):
        cfg = OmegaConf.create(block)
        # a bare `callbacks:` list, or a fuller config with `trainer: callbacks:`
        callbacks = cfg.callbacks if "callbacks" in cfg else cfg.trainer.callbacks
        made = [instantiate(c) for c in callbacks]
        assert made and all(type(m).__name__ == name for m in made)
    if len(made) > 1:
        assert len({m.state_key for m in made}) == len(made)


@pytest.mark.parametrize(
    "name",
    [
        "MultitaskMetricsManager",
        "EnergyForceLoss",
        "EnergyForceStressLoss",
        "EnergyOnlyLoss",
        "UncertaintyWeightingLightningModule",
        "FAMOLightningModule",
    ],
)
def test_train_docstring_yaml_instantiates(name):
    import inspect

    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    import nequip_mtl.train as mt

    obj = getattr(mt, name)
    for block in _yaml_blocks(obj):
        cfg = OmegaConf.create(block).training_module
        loss = instantiate(cfg.loss)
        assert isinstance(loss, mt.MultitaskMetricsManager)
        module_cls = get_class(cfg._target_)
        extra = set(cfg) - {"_target_", "loss"}
        assert extra <= set(inspect.signature(module_cls.__init__).parameters), extra
