"""The ``training_module`` keys a module takes, and the values of the multitask module's own.

Each training module of ``nequip_mtl.train`` calls :func:`check_module_arguments` in its
``__init__``, before nequip builds anything, so that a key the module does not take is
reported as the key the user wrote, the class it went to and what that class accepts,
instead of a bare ``TypeError`` from deep inside nequip or Hydra. For example,
``training_module.lsqr: true`` with ``_target_: MultitaskLightningModule`` (a leftover of
the tutorial's ConFIG module) is refused with

.. code-block:: text

    TypeError: `training_module.lsqr` is an argument of the ConFIG aggregator
    (nequip_mtl.aggregators.ConFIG), not of MultitaskLightningModule: ...

:func:`check_multitask_arguments` checks the values of ``MultitaskLightningModule``'s
own arguments that need no trainer.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from nequip.train import NequIPLightningModule

from .. import aggregators as _aggregators
from ..aggregators import Aggregator, GramAggregator
from ..step import NONFINITE_POLICIES

#: arguments nequip-train passes itself; accepted, but not listed as config keys
_PASSED_BY_NEQUIP_TRAIN = ("num_datasets", "info_dict")


def closest(word: str, names: list[str], n: int, cutoff: float = 0.6) -> list[str]:
    """``difflib``'s closest ``names`` to ``word``, ignoring case (``Config`` -> ``ConFIG``)."""
    by_lower = {name.lower(): name for name in names}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[c] for c in close]


def named_parameters(fn: Any) -> list[str]:
    """The named parameters of a callable (no ``self``, ``*args`` or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return []
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def concrete_aggregators() -> dict[str, type]:
    """``{name: class}`` of the aggregators ``nequip_mtl.aggregators`` exports."""
    out = {}
    for name in _aggregators.__all__:
        cls = getattr(_aggregators, name)
        if name not in ("Aggregator", "GramAggregator"):
            out[name] = cls
    return out


def module_arguments(cls: type) -> tuple[list[str], list[str]]:
    """``(own, nequip)``: the ``__init__`` arguments of ``cls`` and its bases up to
    nequip's ``NequIPLightningModule`` (``own``: those of every class before it, e.g.
    ``aggregator``, ``ema_decay``), and ``NequIPLightningModule``'s own (``nequip``)."""
    own: list[str] = []
    nequip: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        names = named_parameters(vars(klass)["__init__"])
        if klass is NequIPLightningModule:
            nequip = [n for n in names if n not in nequip]
            break
        own += [n for n in names if n not in own]
    return own, nequip


def _aggregators_taking(key: str) -> list[str]:
    return [n for n, c in concrete_aggregators().items() if key in named_parameters(c)]


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
    close = closest(key, sorted(accepted), n=3)
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    listed = [n for n in nequip if n not in _PASSED_BY_NEQUIP_TRAIN]
    raise TypeError(
        f"`training_module.{key}` is not an argument of {who} "
        f"(`training_module._target_`).{hint} {who} takes {sorted(own) or 'no arguments'} "
        f"of its own and NequIPLightningModule's {listed}{also}"
    )


def check_weights_every(value: Any, aggregator: Aggregator) -> int:
    """``weights_every``: an integer >= 1; above 1 only with a Gram-based aggregator."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`weights_every` must be an integer >= 1, got {value!r}")
    if value > 1 and not isinstance(aggregator, GramAggregator):
        raise ValueError(
            f"`weights_every`={value} needs an aggregator whose update is a weighted sum of the "
            f"task gradients (a GramAggregator); {type(aggregator).__name__} is not one. Use "
            "weights_every: 1 (its default), or a Gram-based aggregator such as ConFIG or UPGrad"
        )
    return value


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
