"""What a gradient-aggregation module needs of the trainer: strategy, precision, clipping.

Checked at fit start (:meth:`~nequip_mtl.train.MultitaskLightningModule.on_fit_start`),
where the trainer exists; each error names the config key (``trainer.strategy``,
``trainer.precision``, ``gradient_clip_val``, ...). :func:`active_scaler` is the one
place that asks whether loss scaling (a ``GradScaler``) is on.
"""

from __future__ import annotations

#: the values of ``gradient_clip_algorithm``
CLIP_ALGORITHMS = ("norm", "value")


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


def active_scaler(plugin):
    """The precision plugin's enabled ``GradScaler``, or ``None``."""
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


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


def check_clipping(val, algorithm) -> tuple[float | None, str | None]:
    """The module's own ``gradient_clip_val`` and ``gradient_clip_algorithm`` (``norm`` by
    default), checked; ``(None, None)`` when it clips nothing."""
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
