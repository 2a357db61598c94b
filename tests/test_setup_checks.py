"""Config mistakes a new user makes are refused at setup, in a short message that names the
config key, the class the user wrote and what it accepts.

- a misplaced aggregator argument (ConFIG's ``lsqr`` left in ``training_module``) says
  where it goes; any other unknown key lists the module's keys and nequip's;
- a negative or non-finite ``training_module.loss.coeffs.<name>`` is refused by every
  training module at construction (not at the first optimizer step);
- an unknown aggregator argument names the aggregator and lists its arguments; a
  misspelled aggregator ``_target_`` gives the closest names, without Hydra's traceback;
- ``model.compile_mode: compile`` is confirmed by one INFO line at fit start.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import UPGrad
from nequip_mtl.train.aggregator_spec import build_aggregator
from nequip_mtl.train.arguments import module_arguments
from nequip_mtl.train.callbacks import CalibrateLossCoefficients
from tests._harness import loss_config, model_config, module_kwargs, trainer

ALL_MODULES = [
    mtl.MultitaskLightningModule,
    mtl.EMAMultitaskLightningModule,
    mtl.ConFIGLightningModule,
    mtl.EMAConFIGLightningModule,
    mtl.FAMOLightningModule,
    mtl.UncertaintyWeightingLightningModule,
]
AGGREGATOR_MODULES = ALL_MODULES[:2]
UPGRAD = {"_target_": "nequip_mtl.aggregators.UPGrad"}


def _short(err: BaseException, max_chars: int = 400) -> str:
    """The message, checked to be one short line with no chained traceback."""
    message = str(err)
    assert "\n" not in message and len(message) < max_chars, message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return message


# ---------------------------------------------------------------- 1. module arguments


@pytest.mark.parametrize("cls", AGGREGATOR_MODULES, ids=lambda c: c.__name__)
def test_aggregator_argument_in_the_module_says_where_it_goes(cls):
    """The tutorial's ConFIG `lsqr` left under `training_module`, with ConFIG (the default)
    and with another aggregator; nequip alone would say `NequIPLightningModule.__init__()
    got an unexpected keyword argument 'lsqr'`."""
    with pytest.raises(TypeError) as info:
        cls(lsqr=True, **module_kwargs())
    message = _short(info.value)
    for part in ("`training_module.lsqr`", "ConFIG", cls.__name__, "`training_module.aggregator:`"):
        assert part in message
    with pytest.raises(TypeError) as info:
        cls(lsqr=True, **module_kwargs(aggregator=UPGRAD))
    message = _short(info.value)
    assert "UPGrad, does not take it" in message and "ConFIGLightningModule" in message


@pytest.mark.parametrize("cls", ALL_MODULES[4:], ids=lambda c: c.__name__)
def test_aggregator_argument_in_a_module_without_aggregator(cls):
    with pytest.raises(TypeError, match=f"`training_module.norm_eps`.*{cls.__name__} uses no"):
        cls(norm_eps=1e-8, **module_kwargs())


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_unknown_module_key_lists_the_keys_it_accepts(cls):
    with pytest.raises(TypeError) as info:
        cls(optimiser={"_target_": "torch.optim.Adam"}, **module_kwargs())
    message = _short(info.value, max_chars=800)
    assert f"`training_module.optimiser` is not an argument of {cls.__name__}" in message
    assert "Did you mean `optimizer`?" in message
    own, nequip = module_arguments(cls)
    for key in [*own, "model", "loss", "val_metrics", "lr_scheduler"]:
        assert repr(key) in message, key


def test_module_arguments_are_read_from_the_signatures():
    """Independently of our code: the arguments are those of the classes' ``__init__``."""
    own, nequip = module_arguments(mtl.EMAConFIGLightningModule)
    assert {"lsqr", "norm_eps", "aggregator", "weights_every", "ema_decay"} <= set(own)
    assert nequip == list(NequIPLightningModule.__init__.__code__.co_varnames[1:10])


def test_valid_keys_still_build():
    mtl.EMAMultitaskLightningModule(ema_decay=0.5, **module_kwargs(aggregator=UPGRAD))
    module = mtl.ConFIGLightningModule(lsqr=False, **module_kwargs())
    assert module.aggregator.lsqr is False


# ---------------------------------------------------------------- 3. loss coefficients


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "coeffs",
    [
        {"total_energy": 1.0, "forces": -1.0, "stress": 1.0},
        # nequip normalises by the sum: all negative would turn positive unnoticed
        {"total_energy": -1.0, "forces": -1.0, "stress": -1.0},
        {"total_energy": 1.0, "forces": float("inf"), "stress": 1.0},
    ],
    ids=["one_negative", "all_negative", "inf"],
)
def test_negative_loss_coefficient_is_refused_at_construction(cls, coeffs):
    bad = next(k for k, v in coeffs.items() if not 0 <= v < float("inf"))
    with pytest.raises(ValueError) as info:
        cls(**module_kwargs(loss=loss_config(coeffs)))
    message = _short(info.value)
    assert message.startswith(
        f"{cls.__name__}: `training_module.loss.coeffs`: coefficient of {bad!r} must be "
        "finite and >= 0 (or null), got "
    )


def test_nequip_itself_accepts_them():
    """What the check adds: nequip's module builds with a negative coefficient."""
    coeffs = {"total_energy": 1.0, "forces": -1.0, "stress": 1.0}
    module = NequIPLightningModule(**module_kwargs(loss=loss_config(coeffs)))
    assert module.loss.entries["forces_mse"].coeff == -1.0


@pytest.mark.parametrize("cls", [ALL_MODULES[0], ALL_MODULES[4]], ids=lambda c: c.__name__)
def test_metrics_list_coefficient_names_its_entry(cls):
    loss = {
        "_target_": "nequip.train.MetricsManager",
        "metrics": [
            {"name": "e", "field": "total_energy", "coeff": 1.0, "metric": _mse()},
            {"name": "f", "field": "forces", "coeff": -2.0, "metric": _mse()},
        ],
    }
    with pytest.raises(
        ValueError, match=r"`training_module.loss.metrics\[1\].coeff`: coefficient of 'f' must"
    ):
        cls(**module_kwargs(loss=loss))


def _mse() -> dict:
    return {"_target_": "nequip.train.MeanSquaredError"}


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_zero_and_null_coefficients_pass_the_check(cls):
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": None}
    cls(**module_kwargs(loss=loss_config(coeffs)))


# ---------------------------------------------------------------- 4. aggregators


def test_unknown_aggregator_argument_names_the_aggregator_and_its_arguments():
    spec = {"_target_": "nequip_mtl.aggregators.UPGrad", "pref_vector": [1.0, 2.0]}
    with pytest.raises(TypeError) as info:
        mtl.MultitaskLightningModule(**module_kwargs(aggregator=spec))
    message = _short(info.value)
    assert "SolverAggregator" not in message
    for part in ("`training_module.aggregator.pref_vector`", "UPGrad", "rtol=None"):
        assert part in message
    spec = {"_target_": "nequip_mtl.aggregators.CAGrad", "C": 0.5}
    with pytest.raises(TypeError, match=r"did you mean `c`\?.* c=0.4, rescale=True, rtol=None"):
        build_aggregator(spec, "training_module.aggregator")


@pytest.mark.parametrize(
    "target, closest",
    [
        ("nequip_mtl.aggregators.UPgrad", "nequip_mtl.aggregators.UPGrad"),
        ("nequip_mtl.aggregators.Config", "nequip_mtl.aggregators.ConFIG"),
        ("nequip_mtl.aggregator.PCGrad", "nequip_mtl.aggregators.PCGrad"),
    ],
)
def test_misspelled_aggregator_target_gives_the_closest_names(target, closest):
    with pytest.raises(ValueError) as info:
        mtl.MultitaskLightningModule(**module_kwargs(aggregator={"_target_": target}))
    message = _short(info.value)
    assert f"`training_module.aggregator._target_`={target!r}" in message
    assert closest in message
    # the whole traceback a user sees from the module's constructor is short
    lines = "".join(traceback.format_exception(info.value)).splitlines()
    assert len(lines) < 25, "\n".join(lines)


def test_calibration_callback_uses_the_same_checks():
    with pytest.raises(ValueError, match=r"`CalibrateLossCoefficients.aggregator._target_`"):
        CalibrateLossCoefficients(steps=2, rule="aggregator", aggregator={"_target_": "UPGrad"})
    with pytest.raises(TypeError, match=r"`CalibrateLossCoefficients.aggregator.seed`.*UPGrad"):
        CalibrateLossCoefficients(steps=2, rule="aggregator", aggregator={**UPGRAD, "seed": 1})
    cal = CalibrateLossCoefficients(steps=2, rule="aggregator", aggregator=UPGRAD)
    assert isinstance(cal.aggregator, UPGrad)


def test_the_target_locator(tmp_path, monkeypatch):
    """``nequip_mtl.targets.locate``, the one ``_target_`` locator: attributes of a module
    (nested ones too), ``None`` for a name that does not exist, and the real error of a
    module that exists but cannot be imported. Fails if the locator hides that error as
    "not found" or stops at the first importable prefix's attribute."""
    from nequip_mtl.aggregators import ConFIG
    from nequip_mtl.targets import locate

    assert locate("nequip_mtl.aggregators.ConFIG") is ConFIG
    assert locate("nequip_mtl.aggregators.ConFIG.weights") is ConFIG.weights
    for missing in ("nequip_mtl.aggregators.Nope", "nequip_mtl.nope.ConFIG", "UPGrad"):
        assert locate(missing) is None, missing
    (tmp_path / "needs_absent_dep.py").write_text("import surely_absent_package_xyz\nX = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="surely_absent_package_xyz"):
        locate("needs_absent_dep.X")


# ---------------------------------------------------------------- 6. train-time compile


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_fit_start_logs_train_time_compile(cls, caplog, tmp_path):
    """The model is built, not compiled (nequip compiles at the first forward), so the
    hook is cheap to run; the eager model logs nothing."""
    for mode, expected in (("compile", 1), ("eager", 0)):
        model = {**model_config(), "compile_mode": mode}
        module = cls(**module_kwargs(model=model))
        module.trainer = trainer(tmp_path)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nequip_mtl"):
            module.on_fit_start()
        lines = [r.getMessage() for r in caplog.records if "train-time compile" in r.getMessage()]
        assert len(lines) == expected, (mode, lines)
        if expected:
            assert lines[0].startswith(f"{cls.__name__}: train-time compile is on")


def test_misspelled_target_through_nequip_train_ends_with_the_hint(tmp_path):
    """The user's path: ``nequip-train`` (nequip sets ``HYDRA_FULL_ERROR=1``, so the whole
    traceback prints). Hydra wraps the module's error once; the last line of the output
    is our one-line error with the closest names (it was a ``Did you mean`` buried in a
    chain of three exceptions)."""
    from hydra.errors import InstantiationException

    from nequip_mtl.tools import make_dataset
    from tests._nequip_train import nequip_train

    make_dataset(str(tmp_path / "tiny.xyz"), num_frames=12, seed=0)
    overrides = [
        f"data_file={tmp_path / 'tiny.xyz'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "train_split=8",
        "val_split=2",
        "test_split=2",
        "num_layers=1",
        "num_features=4",
        "run=[train]",
        "training_module._target_=nequip_mtl.train.MultitaskLightningModule",
        "+training_module.aggregator._target_=nequip_mtl.aggregators.UPgrad",
    ]
    with pytest.raises(InstantiationException) as info:
        nequip_train(Path(__file__).resolve().parents[1] / "configs", "tutorial", overrides)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and cause.__cause__ is None
    assert cause.__context__ is None or cause.__suppress_context__
    last = "".join(traceback.format_exception(info.value)).rstrip().splitlines()[-1]
    assert "closest: nequip_mtl.aggregators.UPGrad" in last
