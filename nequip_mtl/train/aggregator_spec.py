"""An aggregator from the Hydra dict a user wrote, with short errors that name the key.

Used by the gradient-aggregation modules (``training_module.aggregator``) and by
:class:`~nequip_mtl.train.callbacks.CalibrateLossCoefficients`
(``CalibrateLossCoefficients.aggregator``): an unknown ``_target_`` gets the closest names
among ``nequip_mtl.aggregators``, an unknown argument the aggregator's arguments, and
neither chains Hydra's traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from hydra.utils import instantiate

from ..aggregators import Aggregator, ConFIG
from ..targets import locate
from .arguments import closest, concrete_aggregators, named_parameters


def _import_error(target: str, where: str) -> ValueError:
    names = list(concrete_aggregators())
    tail = target.rsplit(".", 1)[-1]
    close = closest(tail, names, n=3, cutoff=0.5)
    hint = (
        f"closest: {', '.join(f'nequip_mtl.aggregators.{c}' for c in close)}"
        if close
        else f"nequip_mtl.aggregators has {names}"
    )
    return ValueError(
        f"`{where}._target_`={target!r} cannot be imported; {hint} (or give an importable "
        "subclass of nequip_mtl.aggregators.Aggregator)"
    )


def _check_arguments(cls: type, spec: Mapping, where: str) -> None:
    """Every key of ``spec`` that is not Hydra's own is an argument of ``cls``."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = named_parameters(cls)
    for key in spec:
        if not key.startswith("_") and key not in allowed:
            args = [
                f"{n}={params[n].default!r}"
                if params[n].default is not inspect.Parameter.empty
                else n
                for n in allowed
            ]
            close = closest(key, allowed, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise TypeError(
                f"`{where}.{key}`: the aggregator {cls.__name__} (`{where}._target_`) takes "
                f"no argument {key!r}{hint}; its arguments are "
                f"{', '.join(args) if args else 'none'}"
            )


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
    cls = locate(target)
    if cls is None:
        raise _import_error(target, where) from None
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(
            f"`{where}._target_`={target!r} is a {getattr(cls, '__name__', cls)}, "
            "not a nequip_mtl.aggregators.Aggregator"
        )
    _check_arguments(cls, spec, where)
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
