"""ConFIG training modules: drop-in replacements for nequip's."""

from __future__ import annotations

from .multitask import EMAMultitaskLightningModule, MultitaskLightningModule


class _FixedAggregatorMixin:
    """Builds the fixed ConFIG aggregator from the named module's own arguments.

    The aggregator goes to the parent as a plain Hydra dict, so the hyperparameters that
    Lightning saves in checkpoints stay plain data (loadable with ``weights_only=True``);
    reloading passes that same dict back, which is accepted.
    """

    def __init__(self, lsqr: bool = True, norm_eps: float = 1e-8, **kwargs):
        fixed = {"_target_": "nequip_mtl.aggregators.ConFIG", "lsqr": lsqr, "norm_eps": norm_eps}
        given = kwargs.pop("aggregator", fixed)
        if given != fixed:
            raise ValueError(
                f"{type(self).__name__} always uses ConFIG (configured by `lsqr` and "
                f"`norm_eps`) and takes no other `aggregator`, got {given!r}; use "
                "nequip_mtl.train.MultitaskLightningModule to choose another aggregator"
            )
        super().__init__(aggregator=fixed, **kwargs)


class ConFIGLightningModule(_FixedAggregatorMixin, MultitaskLightningModule):
    """Conflict-free inverse gradients (`ConFIG <https://arxiv.org/abs/2408.11104>`_).

    A drop-in replacement for :class:`nequip.train.ConFIGLightningModule`: change only
    the ``_target_``. It accepts the same arguments and computes the same update (the
    loss coefficients are ConFIG's ``b`` vector), but uses Lightning's automatic
    optimization, so that trainer-level ``gradient_clip_val``, every LR scheduler
    (e.g. ``CosineAnnealingLR``, warm-up with ``SequentialLR``, step-interval schedulers,
    ``ReduceLROnPlateau`` on any metric), ``accumulate_grad_batches`` and DDP work, loss
    components with ``coeff: null`` may sit anywhere in the loss, and frozen parameters
    get no gradient. See :class:`~nequip_mtl.train.MultitaskLightningModule` for the
    shared mechanics, logging and fault handling.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.ConFIGLightningModule
          loss:
            _target_: nequip.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
          optimizer:
            _target_: torch.optim.Adam
            lr: 0.01
          lr_scheduler:
            scheduler:
              _target_: torch.optim.lr_scheduler.CosineAnnealingLR
              T_max: 100
            interval: epoch
          # model, val_metrics, ...: as for nequip.train.NequIPLightningModule

    Args:
        lsqr (bool): least-squares (``True``, default) or pseudo-inverse solve; both give
            the minimum-norm solution (see :class:`nequip_mtl.aggregators.ConFIG`)
        norm_eps (float): floor for norms in normalisations (default ``1e-8``)
        **kwargs: arguments of :class:`~nequip_mtl.train.MultitaskLightningModule`
            (``on_nonfinite``, ``gradient_clip_val``, ...) and of
            :class:`~nequip.train.NequIPLightningModule`
    """


class EMAConFIGLightningModule(_FixedAggregatorMixin, EMAMultitaskLightningModule):
    """ConFIG with an exponential moving average of the weights.

    A drop-in replacement for :class:`nequip.train.EMAConFIGLightningModule`; see
    :class:`ConFIGLightningModule` and :class:`~nequip_mtl.train.EMAMultitaskLightningModule`.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.EMAConFIGLightningModule
          ema_decay: 0.999
          # loss, model, optimizer, ...: as for nequip.train.NequIPLightningModule

    Args:
        lsqr (bool): least-squares (default) or pseudo-inverse solve
        norm_eps (float): floor for norms in normalisations (default ``1e-8``)
        ema_decay (float): EMA decay constant (default ``0.999``)
        **kwargs: arguments of :class:`~nequip_mtl.train.MultitaskLightningModule`
    """
