"""Setup-time checks of a training-module config: short errors that name the config key.

Pure functions, no state. Each training module of ``nequip_mtl.train`` calls them in its
``__init__`` (before nequip builds anything) or at fit start, so that a config mistake is
reported as the key the user wrote, the class it went to and what that class accepts,
instead of a ``TypeError`` from deep inside nequip or Hydra:

- :func:`check_module_arguments`: every ``training_module`` key is an argument of the module
  (a misplaced aggregator argument such as ConFIG's ``lsqr`` says where it goes);
- :func:`check_loss_coeffs`: the ``training_module.loss`` coefficients are finite and
  ``>= 0`` (or null), checked on the config, before nequip normalises them;
- :func:`build_aggregator`: an aggregator from its Hydra dict, with a short error for an
  unknown ``_target_`` (the closest names) or argument (the aggregator's arguments);
- :func:`log_train_time_compile`: one INFO line at fit start when the model is compiled
  for training (``model.compile_mode: compile``).

For example, ``training_module.lsqr: true`` with ``_target_: MultitaskLightningModule``
(a leftover of the tutorial's ConFIG module) is refused at construction with

.. code-block:: text

    TypeError: `training_module.lsqr` is an argument of the ConFIG aggregator
    (nequip_mtl.aggregators.ConFIG), not of MultitaskLightningModule: ...
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from nequip.train import NequIPLightningModule

from .. import aggregators as _aggregators
from ..aggregators import Aggregator, ConFIG, GramAggregator
from ..step import NONFINITE_POLICIES, TASK_KINDS

logger = logging.getLogger(__name__)

#: arguments nequip-train passes itself; accepted, but not listed as config keys
CLIP_ALGORITHMS = ("norm", "value")
_PASSED_BY_NEQUIP_TRAIN = ("num_datasets", "info_dict")


# ---------------------------------------------------------------- module arguments


def _closest(word: str, names: list[str], n: int, cutoff: float = 0.6) -> list[str]:
    """``difflib``'s closest ``names`` to ``word``, ignoring case (``Config`` -> ``ConFIG``)."""
    by_lower = {name.lower(): name for name in names}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[c] for c in close]


def _named_parameters(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def module_arguments(cls: type) -> tuple[list[str], list[str]]:
    """``(own, nequip)``: the ``__init__`` arguments of ``cls`` and its bases up to
    nequip's ``NequIPLightningModule`` (``own``: those of every class before it, e.g.
    ``aggregator``, ``ema_decay``), and ``NequIPLightningModule``'s own (``nequip``)."""
    own: list[str] = []
    nequip: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        names = _named_parameters(vars(klass)["__init__"])
        if klass is NequIPLightningModule:
            nequip = [n for n in names if n not in nequip]
            break
        own += [n for n in names if n not in own]
    return own, nequip


def _concrete_aggregators() -> dict[str, type]:
    out = {}
    for name in _aggregators.__all__:
        cls = getattr(_aggregators, name)
        if name not in ("Aggregator", "GramAggregator"):
            out[name] = cls
    return out


def _aggregators_taking(key: str) -> list[str]:
    return [n for n, c in _concrete_aggregators().items() if key in _named_parameters(c)]


def _target_name(spec: Any) -> str | None:
    if isinstance(spec, Mapping) and isinstance(spec.get("_target_"), str):
        return spec["_target_"].rsplit(".", 1)[-1]
    if isinstance(spec, Aggregator):
        return type(spec).__name__
    return None


def _modules_taking(key: str, exclude: type) -> list[str]:
    """The training modules of ``nequip_mtl.train`` with an own argument ``key``."""
    from nequip_mtl import train  # the modules import this file

    out = []
    for name in train.__all__:
        obj = getattr(train, name)
        if isinstance(obj, type) and issubclass(obj, NequIPLightningModule) and obj is not exclude:
            if key in module_arguments(obj)[0]:
                out.append(name)
    return out


def check_module_arguments(cls: type, kwargs: Mapping[str, Any], aggregator: Any = None) -> None:
    """Refuse a ``training_module`` key that ``cls`` (the module class the user wrote) does
    not take, before nequip's ``__init__`` fails on it with a bare ``TypeError``.

    The error names the key and the class. An argument of one of our aggregators (e.g.
    ConFIG's ``lsqr``) says where it goes (under ``aggregator:``, or that this module takes
    no aggregator); any other key lists the keys ``cls`` accepts, its own and
    ``NequIPLightningModule``'s, and the closest ones. ``aggregator`` is the module's
    ``aggregator`` argument, if it takes one (``None``: the default, ConFIG).

    Raises:
        TypeError: for the first unknown key
    """
    own, nequip = module_arguments(cls)
    accepted = set(own) | set(nequip)
    unknown = [k for k in kwargs if k not in accepted]
    if not unknown:
        return
    key = unknown[0]
    who = cls.__name__
    takers = _aggregators_taking(key)
    modules = _modules_taking(key, exclude=cls)
    also = ""
    if modules:
        names = " or ".join(f"nequip_mtl.train.{m}" for m in modules)
        also = f"; or use {names}, which {'takes' if len(modules) == 1 else 'take'} it"
    if takers:
        plural = "s" if len(takers) > 1 else ""
        what = f"an argument of the {' and '.join(takers)} aggregator{plural}"
        if "aggregator" in accepted:
            current = _target_name(aggregator) or "ConFIG"
            where = (
                f"with {who} set it under `training_module.aggregator:` (next to its "
                f"`_target_: nequip_mtl.aggregators.{current}`)"
                if current in takers
                else f"your aggregator, {current}, does not take it: delete it"
            )
        else:
            where = f"{who} uses no aggregator: delete it"
        raise TypeError(f"`training_module.{key}` is {what}, not of {who}: {where}{also}")
    close = _closest(key, sorted(accepted), n=3)
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    listed = [n for n in nequip if n not in _PASSED_BY_NEQUIP_TRAIN]
    raise TypeError(
        f"`training_module.{key}` is not an argument of {who} "
        f"(`training_module._target_`).{hint} {who} takes {sorted(own) or 'no arguments'} "
        f"of its own and NequIPLightningModule's {listed}{also}"
    )


# ---------------------------------------------------------------- loss coefficients


def _check_coeff(value: Any, key: str, who: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: `{key}` must be a number or null, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{who}: `{key}`={value!r}; loss coefficients must be finite and >= 0 "
            "(null leaves the term out of the loss)"
        )


def _check_coeff_tree(coeffs: Any, key: str, who: str) -> None:
    """``coeffs`` of a loss: ``{name: coeff}``, or per dataset ``{dataset: {name: coeff}}``
    (:func:`~nequip_mtl.train.PerDatasetLoss`)."""
    if not isinstance(coeffs, Mapping):
        return
    for name, value in coeffs.items():
        if isinstance(value, Mapping):
            _check_coeff_tree(value, f"{key}.{name}", who)
        else:
            _check_coeff(value, f"{key}.{name}", who)


def check_loss_coeffs(loss: Any, who: str) -> None:
    """Check the coefficients of a ``training_module.loss`` config before nequip builds it.

    nequip's ``MetricsManager`` accepts negative coefficients and normalises by their sum
    (so all-negative coefficients turn positive, and a zero sum leaves no loss); our modules
    need each to be finite and ``>= 0``. Checked here: ``loss.coeffs.<name>`` (nequip's
    ``EnergyForceLoss`` & co., ours), ``loss.coeffs.<dataset>.<name>`` (``PerDatasetLoss``) and ``loss.metrics[i].coeff`` (a ``MetricsManager``).

    Raises:
        ValueError: a negative or non-finite coefficient, naming ``who`` (the module class)
            and the key, e.g. ``training_module.loss.coeffs.forces``
        TypeError: a coefficient that is not a number or null
    """
    if not isinstance(loss, Mapping):
        return
    _check_coeff_tree(loss.get("coeffs"), "training_module.loss.coeffs", who)
    metrics = loss.get("metrics")
    if isinstance(metrics, (list, tuple)):
        for i, metric in enumerate(metrics):
            if isinstance(metric, Mapping):
                name = metric.get("name", "")
                label = f"training_module.loss.metrics[{i}].coeff" + (
                    f" (component {name!r})" if name else ""
                )
                _check_coeff(metric.get("coeff"), label, who)


# ---------------------------------------------------------------- aggregators


def _import_error(target: str, where: str) -> ValueError:
    names = list(_concrete_aggregators())
    tail = target.rsplit(".", 1)[-1]
    close = _closest(tail, names, n=3, cutoff=0.5)
    hint = (
        f"closest: {', '.join(f'nequip_mtl.aggregators.{c}' for c in close)}"
        if close
        else f"nequip_mtl.aggregators has {names}"
    )
    return ValueError(
        f"`{where}._target_`={target!r} cannot be imported; {hint} (or give an importable "
        "subclass of nequip_mtl.aggregators.Aggregator)"
    )


def _locate(target: str) -> Any:
    """The object a dotted ``_target_`` names, or ``None`` (quietly, unlike Hydra's
    ``get_class``, which logs an error before raising)."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and not (module + ".").startswith(err.name + "."):
                raise  # the module exists, but something it imports does not
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def build_aggregator(spec: Mapping | Aggregator | None, where: str) -> Aggregator:
    """Build an aggregator from its Hydra dict (``None``: ConFIG; an instance is kept).

    ``where`` is the config key of ``spec`` (e.g. ``training_module.aggregator``), named in
    every error. A ``_target_`` that cannot be imported gives a short error with the
    closest names among ``nequip_mtl.aggregators``; an argument the aggregator does not
    take names the aggregator and lists its arguments; neither chains Hydra's traceback.

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:                 # `where` is training_module.aggregator
            _target_: nequip_mtl.aggregators.UPGrad
            rtol: 1.0e-6
    """
    if spec is None:
        return ConFIG()
    if isinstance(spec, Aggregator):
        return spec
    if not isinstance(spec, Mapping) or not isinstance(spec.get("_target_"), str):
        raise TypeError(
            f"`{where}` must be a dict with a `_target_` naming a nequip_mtl.aggregators "
            f"class (e.g. {{_target_: nequip_mtl.aggregators.ConFIG}}), got {spec!r}"
        )
    target = spec["_target_"]
    cls = _locate(target)
    if cls is None:
        raise _import_error(target, where) from None
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(
            f"`{where}._target_`={target!r} is a {getattr(cls, '__name__', cls)}, "
            "not a nequip_mtl.aggregators.Aggregator"
        )
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        allowed = _named_parameters(cls)
        for key in spec:
            if not key.startswith("_") and key not in allowed:
                args = [
                    f"{n}={params[n].default!r}"
                    if params[n].default is not inspect.Parameter.empty
                    else n
                    for n in allowed
                ]
                close = _closest(key, allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise TypeError(
                    f"`{where}.{key}`: the aggregator {cls.__name__} (`{where}._target_`) takes "
                    f"no argument {key!r}{hint}; its arguments are "
                    f"{', '.join(args) if args else 'none'}"
                )
    args = {k: v for k, v in spec.items() if k != "_target_"}
    if any(k.startswith("_") or isinstance(v, (Mapping, list)) for k, v in args.items()):
        built = instantiate(dict(spec))  # Hydra's own keys or nested configs
    else:
        built = cls(**args)  # the aggregator's own errors, without Hydra's wrapping
    if not isinstance(built, Aggregator):  # pragma: no cover - a factory, not a class
        raise TypeError(
            f"`{where}._target_`={target!r} built a {type(built).__name__}, "
            "which is not a nequip_mtl.aggregators.Aggregator"
        )
    return built


# ---------------------------------------------------------------- compile


def log_train_time_compile(module: Any) -> bool:
    """Log one INFO line when ``module``'s model is compiled for training; return whether.

    nequip builds a ``CompileGraphModel`` for ``model.compile_mode: compile`` and compiles
    it lazily, at the first forward pass, without saying so; this line confirms the
    setting took effect.
    """
    models = getattr(module, "model", None)
    models = list(models.values()) if isinstance(models, torch.nn.ModuleDict) else [models]
    compiled = [m for m in models if getattr(m, "is_compile_graph_model", False)]
    if compiled:
        logger.info(
            "%s: train-time compile is on (model.compile_mode: compile); the model is "
            "compiled with torch.compile at the first training step",
            type(module).__name__,
        )
    return bool(compiled)


# ---------------------------------------------------------------- the multitask module


def check_strategy(strategy) -> None:
    """Reject Lightning strategies whose gradient handling we do not support.

    Supported: single device, and data parallel with replicated parameters
    (:class:`~nequip.train.SimpleDDPStrategy`, Lightning's ``DDPStrategy``). Sharded
    strategies (FSDP, DeepSpeed, model parallel) split parameters or gradients across
    ranks, so no rank holds the full per-task gradient matrix to aggregate.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"`trainer.strategy`={type(strategy).__name__} is not supported by gradient-"
            "aggregation training modules; use a single device, "
            "nequip.train.SimpleDDPStrategy, or lightning's DDPStrategy"
        )


def check_precision(plugin, on_nonfinite: str) -> None:
    """Reject precision plugins whose loss scaling we do not know how to undo.

    Supported: full precision (``32-true``, ``64-true``), ``16-true``/``bf16-true``, and
    automatic mixed precision (``16-mixed`` with or without a ``GradScaler``,
    ``bf16-mixed``). With a ``GradScaler`` an overflowing step is always the scaler's to
    skip, so ``on_nonfinite: zero_task`` (which would apply the other tasks) is refused.
    """
    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )

    if type(plugin) not in (Precision, DoublePrecision, HalfPrecision) and not isinstance(
        plugin, MixedPrecision
    ):
        raise ValueError(
            f"the precision plugin {type(plugin).__name__} (`trainer.precision` / "
            "`trainer.plugins`) is not supported by gradient-aggregation training modules; use "
            "32-true, 64-true, 16-mixed or bf16-mixed"
        )
    if active_scaler(plugin) is not None and on_nonfinite == "zero_task":
        raise ValueError(
            "`training_module.on_nonfinite`=zero_task cannot be combined with a GradScaler "
            "(`trainer.precision`=16-mixed): an overflowing task gradient means the loss scale "
            "is too large, and the scaler must skip the whole step; use on_nonfinite: skip"
        )


def _entry_datasets(manager) -> dict[str, str | None]:
    """``{component: the dataset whose frames it keeps, or None}``."""
    return {name: getattr(entry.field, "dataset", None) for name, entry in manager.entries.items()}


def component_datasets(manager) -> dict[str, str] | None:
    """``{component: dataset}`` when every loss component keeps one dataset's frames (a
    ``PerDatasetLoss``), else ``None``."""
    if manager is None:
        return None
    datasets = _entry_datasets(manager)
    return None if any(d is None for d in datasets.values()) else datasets


def datasets_of_components(manager, tasks: str) -> dict[str, str] | None:
    """``{component: dataset}`` for ``tasks: datasets`` (``None`` for components)."""
    if tasks not in TASK_KINDS:
        raise ValueError(
            f"`training_module.tasks` must be one of {list(TASK_KINDS)}, got {tasks!r}"
        )
    if tasks == "components" or manager is None:
        return None
    datasets = _entry_datasets(manager)
    missing = [name for name, d in datasets.items() if d is None]
    if missing:
        raise ValueError(
            f"`training_module.tasks: datasets` groups the loss components by training dataset, "
            f"but {missing} belong to no dataset; build the loss with "
            "nequip_mtl.train.PerDatasetLoss (components named <dataset>/<component>)"
        )
    return datasets


def check_weights_every(value: Any, aggregator: Aggregator) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`weights_every` must be an integer >= 1, got {value!r}")
    if value > 1 and not isinstance(aggregator, GramAggregator):
        raise ValueError(
            f"`weights_every`={value} needs an aggregator whose update is a weighted sum of the "
            f"task gradients (a GramAggregator); {type(aggregator).__name__} is not one. Use "
            "weights_every: 1 (its default), or a Gram-based aggregator such as ConFIG or UPGrad"
        )
    return value


def check_clipping(val, algorithm) -> tuple[float | None, str | None]:
    if val is None:
        if algorithm is not None:
            raise ValueError(
                f"`gradient_clip_algorithm`={algorithm!r} is set but `gradient_clip_val` is not"
            )
        return None, None
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
        raise ValueError(f"`gradient_clip_val` must be a number > 0, got {val!r}")
    algorithm = "norm" if algorithm is None else algorithm
    if algorithm not in CLIP_ALGORITHMS:
        raise ValueError(
            f"`gradient_clip_algorithm` must be one of {list(CLIP_ALGORITHMS)}, got {algorithm!r}"
        )
    return float(val), algorithm


def check_clipping_once(module_clip_val: float | None, trainer_clip_val: float | None) -> None:
    """Module-level and trainer-level clipping together are refused."""
    if module_clip_val is not None and trainer_clip_val is not None:
        raise ValueError(
            "gradient clipping is configured twice: `training_module.gradient_clip_val`="
            f"{module_clip_val} and `trainer.gradient_clip_val`={trainer_clip_val}; "
            "set only one (the trainer's is preferred)"
        )


def check_multitask_arguments(
    aggregator: Aggregator, weights_every: Any, on_nonfinite: Any, max_consecutive_skips: Any, loss
) -> None:
    """The ``MultitaskLightningModule`` arguments that need no trainer."""
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"`on_nonfinite` must be one of {list(NONFINITE_POLICIES)}, got {on_nonfinite!r}"
        )
    check_weights_every(weights_every, aggregator)
    if max_consecutive_skips is not None and (
        isinstance(max_consecutive_skips, bool)
        or not isinstance(max_consecutive_skips, int)
        or max_consecutive_skips < 1
    ):
        raise ValueError(
            "`max_consecutive_skips` must be an integer >= 1 or null (no limit), got "
            f"{max_consecutive_skips!r}"
        )
    if loss is not None and len(loss) < 1:
        raise ValueError("`loss` must have at least one loss component")


def active_scaler(plugin):
    """The precision plugin's enabled ``GradScaler``, or ``None``."""
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None
