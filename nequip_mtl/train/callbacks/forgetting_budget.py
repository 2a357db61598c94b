"""Fine-tuning with a forgetting budget: the replay weight adapted to keep the replayed
dataset's loss within a tolerance of the pretrained model's."""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch
from nequip.data import AtomicDataDict

from ...data.frame_predictions import FramePredictions
from ...data.keys import DATASET_INDEX_KEY
from ...weighting.budget import DualAscentMultiplier
from ..coefficients import current_coeffs, update_coeffs
from ..sub_batches import select_frames
from ._common import (
    OptimizerStepCallback,
    WeightingCallback,
    check_coeff_writer_allowed,
    loss_manager,
    no_coefficient_schedule,
    single_adaptive_callback,
)

_WHO = "ForgettingBudget"
#: the constraint on the replay components' weighted sum (the default)
_ALL = "loss"


class ForgettingBudget(OptimizerStepCallback, WeightingCallback):
    """Keep the replayed dataset's loss within ``tolerance`` of the pretrained model's.

    Replay fine-tuning trains ``L_new + w L_replay``, and the replay weight ``w`` is a
    trade-off a user otherwise finds by a sweep. Here the user states the trade-off
    instead: "improve on my data, and let the replayed data's loss rise at most 5 % above
    the pretrained model's". The replay weight becomes the Lagrange multiplier of that
    constraint, moved by dual ascent
    (:class:`~nequip_mtl.weighting.budget.DualAscentMultiplier`): up while the replay loss is
    over the budget, down while it is under, every ``every`` optimizer steps, from the mean
    of the observed ratios since the last update.

    - **The reference** (``tolerance``) is the pretrained model's replay loss, measured once
      when training starts (before the first step; restored, not re-measured, on a restart)
      on up to ``reference_frames`` frames of the replayed dataset's training split, with
      the loss's own replay components at their configured coefficients. The constraint is
      ``loss / reference <= 1 + tolerance``.
    - **An absolute limit** (``limit``, instead of ``tolerance``): the constraint is
      ``loss / limit <= 1``, in the loss's own units (the configured-coefficient combination
      of the replay components, as logged in ``train_loss_*``). Use it for *pseudolabels*
      of the pretrained model (:class:`~nequip_mtl.data.PseudolabelledDataset`): they are
      its own predictions, so its loss on them, the relative budget's reference, is zero.
      A relative budget on such a dataset is refused at setup.
    - **The ratio** of an update (the default, ``ratio_frames: all``) is the replay loss
      measured with the current model on the reference's frames over the reference: the
      constraint itself at the current parameters, the very ratio the end-of-training
      check measures, the same on every rank, at the cost of a forward pass over
      ``reference_frames`` frames every ``every`` steps. ``ratio_frames: N`` measures on
      the first ``N`` of them only (over the pretrained model's loss on those, measured
      with the reference): a subset's ratio is a different one (the per-frame losses are
      heavy-tailed, and fine-tuning moves them unequally), which the controller then holds
      instead. With the learning rate annealed to zero by the end of training, the default
      ended within its bound in every seed of the fine-tuning benchmark
      (``docs/choosing.md``).
    - **Or from the training batches** (``ratio_frames: null``), free of any measurement:
      by default (``paired``) the replay components' loss on each batch over the
      pretrained model's loss on *the same frames*: that model's predictions on every
      frame of the replayed training split are recorded once, with the reference (a
      forward pass over the split; kept in checkpoints), and its loss on a batch is those
      predictions' loss against the batch's labels, through the loss's own metrics; an
      update's ratio is the ratio of the losses summed since the last one. The pairing
      cancels the frames' own difficulty, but a few replayed frames a batch remain an
      estimate: fine-tuning moves frames unequally, and the multiplier follows the noise.
      Under DDP both losses are global means (the loss synchronises its step values); a
      batch without replay frames is not observed. ``paired: false`` divides by the
      reference instead, a noisier estimate still (with 4 replayed frames a batch, 10-step
      means from 0.4 to 2.8 at the pretrained model itself on the alloy pair of
      ``benchmarks/finetune.py``).
    - **Each component** (``each_component: true``): a bound on each replayed component's
      loss (energy, forces, stress) instead of their weighted sum, each with its own
      reference, ratio and multiplier, which scales that component's coefficient only. A
      sum can stay within 5 % while one component, typically the energy, whose loss is
      the smaller part, rises far more; and where fine-tuning does not degrade a
      component (forces often keep improving on the old data), its multiplier falls to its
      floor and its replay stops costing the new data anything. Logged as
      ``budget/<dataset>/<component>/*`` (e.g. ``budget/pretrain/forces_mse/multiplier``);
      ``final_ratio`` is the largest component's.
    - **The coefficients** of the replay components are their configured values times the
      multiplier (then normalised with the others, as every coefficient update is); the
      others keep theirs. Every micro-batch of an optimizer step sees the same
      coefficients.
    - **Sampled replay** (``sample_replay: true``): while the multiplier ``lambda`` is
      below 1, a micro-batch keeps its replayed frames with probability ``lambda`` only,
      at the configured weight (``lambda / p`` with ``p = lambda``), and is otherwise
      trained on its other frames alone; at ``lambda >= 1`` every batch replays, weighted
      as above. The expected replay gradient is the weighted sum's, ``lambda`` times the
      replay loss's, but a batch whose replay is dropped costs a batch of new data only:
      replay is paid for in proportion to what the budget asks of it, where a weight of
      0.05 would still forward and back-propagate every replayed frame. (The coefficients
      are normalised to sum to one, so the update's overall scale differs from the
      weighted sum's by a factor between 1 and 2, which Adam's normalisation removes.)
      The draws are a function of ``seed``, the optimizer step and the batch index: the
      same on every rank and across restarts. A batch made of replayed frames only keeps
      them. With ``each_component``, ``p`` is the largest multiplier (capped at 1) and
      each coefficient its multiplier over ``p``. Logged as
      ``budget/<dataset>/replay_probability``.
    - **Logged** every optimizer step: ``budget/<dataset>/multiplier``,
      ``budget/<dataset>/ratio`` (the mean ratio of the last update) and
      ``budget/<dataset>/limit`` (its bound: ``1 + tolerance``, or ``1``);
      ``nequip-mtl-plot`` draws them in ``loss_coefficients.png``.
    - **Whether the budget held**: when training ends, the replay loss is measured again
      on the reference's frames with the trained model, exactly as the reference was
      (``final_ratio``: that loss over the reference, or over the limit). The step ratios
      are batch estimates; this is the answer to "did the fine-tune stay within its
      budget?". Logged to the trainer's loggers as ``budget/<dataset>/final_ratio`` and
      kept in the callback's state.

    Works with :class:`~nequip.train.NequIPLightningModule` (the weighted sum) and with
    :class:`~nequip_mtl.train.MultitaskLightningModule`; needs a per-dataset loss
    (:func:`~nequip_mtl.train.PerDatasetLoss`) and
    :class:`~nequip_mtl.data.MultiDatasetDataModule`.

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.ForgettingBudget
            dataset: pretrain        # the replayed dataset
            tolerance: 0.05          # its loss may rise at most 5 % above the pretrained model's
            # limit: 5.0e-4          # or: at most this loss (pseudolabels), instead of tolerance
            # every: 10              # optimizer steps between multiplier updates
            # step_size: 1.0         # log-space step per unit of relative violation
            # proportional: 0.0      # PI control: log-space gain on the current violation
            # reference_frames: 64   # frames the reference loss is measured on
            # ratio_frames: all      # each update measured on them; null: from the batches
            # paired: true           # (batches) over the pretrained model's loss on them
            # each_component: false  # true: bound energy, forces, ... each, not their sum
            # sample_replay: false   # true: below weight 1, replay that often instead

    Args:
        dataset (str): the replayed dataset's name (the data module's and the loss's)
        tolerance (float): allowed relative rise of its loss (``> 0``)
        limit (float): instead of ``tolerance``, the largest allowed loss (``> 0``)
        every (int): optimizer steps between multiplier updates (default ``10``)
        step_size (float): dual-ascent step in log space (default ``1.0``)
        proportional (float): the PI controller's proportional gain in log space (default
            ``0.0``: plain dual ascent; see
            :class:`~nequip_mtl.weighting.budget.DualAscentMultiplier`)
        initial (float): the multiplier's start (default ``1.0``: the configured weights)
        bounds (list of float): ``[min, max]`` of the multiplier (default ``[1e-3, 1e3]``)
        reference_frames (int): frames of the replayed training split to measure the
            reference on (default ``64``; all, if it has fewer)
        reference_batch_size (int): frames per forward pass of that measurement (default 16)
        ratio_frames (int, ``all`` or ``None``): measure each update's ratio on the first
            this many of the reference's frames (default ``all``: on every one of them), or
            estimate it from the training batches (``None``)
        each_component (bool): bound each replayed component's loss, each with its own
            multiplier, instead of their weighted sum (default ``false``; needs
            ``tolerance``)
        paired (bool): with ``ratio_frames: None``, a batch's loss over the pretrained
            model's on its frames (default) or over the reference (``false``)
        sample_replay (bool): keep a batch's replayed frames with probability
            ``min(1, multiplier)`` instead of weighting them down (default ``false``)
        seed (int): the seed of those draws (default ``0``)
    """

    def __init__(
        self,
        dataset: str,
        tolerance: float | None = None,
        limit: float | None = None,
        every: int = 10,
        step_size: float = 1.0,
        initial: float = 1.0,
        bounds: tuple[float, float] | list[float] = (1e-3, 1e3),
        reference_frames: int = 64,
        reference_batch_size: int = 16,
        proportional: float = 0.0,
        ratio_frames: int | str | None = "all",
        paired: bool | None = None,
        each_component: bool = False,
        sample_replay: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"{_WHO}.dataset must be a dataset name, got {dataset!r}")
        if ratio_frames == "all":  # the reference's frames: the ratio the final check measures
            ratio_frames = reference_frames
        elif isinstance(ratio_frames, str):
            raise ValueError(
                f"{_WHO}.ratio_frames must be an integer >= 1, `all` (the reference's frames) "
                f"or null (the training batches), got {ratio_frames!r}"
            )
        for key, value in (
            ("reference_frames", reference_frames),
            ("reference_batch_size", reference_batch_size),
            *([("ratio_frames", ratio_frames)] if ratio_frames is not None else []),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_WHO}.{key} must be an integer >= 1, got {value!r}")
        if ratio_frames is not None and ratio_frames > reference_frames:
            raise ValueError(
                f"{_WHO}.ratio_frames ({ratio_frames}) must be at most reference_frames "
                f"({reference_frames}): the ratio is measured on the first of the reference's "
                "frames"
            )
        if (tolerance is None) == (limit is None):
            raise ValueError(
                f"{_WHO}: give exactly one of `tolerance` (relative to the pretrained model's "
                f"loss) and `limit` (an absolute loss); got tolerance={tolerance!r}, "
                f"limit={limit!r}"
            )
        if paired is None:  # by default wherever it applies
            paired = limit is None and ratio_frames is None
        elif not isinstance(paired, bool):
            raise ValueError(f"{_WHO}.paired must be true or false, got {paired!r}")
        elif paired and (limit is not None or ratio_frames is not None):
            raise ValueError(
                f"{_WHO}.paired pairs each batch's replay loss with the pretrained model's on "
                "the same frames: it applies to a `tolerance` budget measured on batches, not "
                f"with `limit` (got {limit!r}) or `ratio_frames` (got {ratio_frames!r}; "
                "`ratio_frames: null` measures on batches)"
            )
        if not isinstance(each_component, bool):
            raise ValueError(f"{_WHO}.each_component must be true or false, got {each_component!r}")
        if each_component and limit is not None:
            raise ValueError(
                f"{_WHO}.each_component bounds each replayed component's loss relative to the "
                f"pretrained model's; an absolute `limit` ({limit!r}) is one bound on their "
                "weighted sum: give `tolerance`, or drop `each_component`"
            )
        if not isinstance(sample_replay, bool):
            raise ValueError(f"{_WHO}.sample_replay must be true or false, got {sample_replay!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{_WHO}.seed must be an integer, got {seed!r}")
        key, value = ("tolerance", tolerance) if limit is None else ("limit", limit)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{_WHO}: `{key}` must be a number > 0, got {value!r}")
        #: the absolute limit, or ``None`` for a budget relative to the measured reference
        self.limit = None if limit is None else float(limit)
        self.tolerance = None if tolerance is None else float(tolerance)
        bound = 1.0 if limit is not None else 1.0 + float(tolerance)
        self._controller = {"bound": bound, "step_size": step_size, "every": every,
                            "initial": initial, "bounds": tuple(bounds), "proportional": proportional}  # fmt: skip
        try:
            DualAscentMultiplier(**self._controller)  # the settings checked
        except ValueError as err:
            raise ValueError(f"{_WHO}: {err}") from None
        self.each_component = each_component
        self.sample_replay = sample_replay
        self.seed = seed
        #: the probability that this optimizer step's micro-batches keep their replayed
        #: frames (``1`` without ``sample_replay``)
        self.replay_probability = 1.0
        #: whether this micro-batch drew to drop its replayed frames (``sample_replay``)
        self._dropped = False
        #: the largest allowed ratio of every constraint (``1 + tolerance``, or ``1``)
        self.bound = bound
        self.dataset = dataset
        self.reference_frames = reference_frames
        self.reference_batch_size = reference_batch_size
        self.ratio_frames = ratio_frames
        self.paired = paired
        #: the pretrained model's predictions on the replayed training frames (``paired``;
        #: ``None`` until recorded)
        self.pretrained: FramePredictions | None = None
        #: the constraints: their names and the replay components each bounds (one, named
        #: ``loss``, on their weighted sum; or, ``each_component``, one per component, named
        #: as it is without the dataset: ``forces_mse``); set at setup
        self.groups: dict[str, list[str]] = {} if each_component else {_ALL: []}
        #: each constraint's multiplier
        self.duals: dict[str, DualAscentMultiplier] = {
            g: DualAscentMultiplier(**self._controller) for g in self.groups
        }
        #: each constraint's pretrained loss on the first ``ratio_frames`` frames (the
        #: fixed-frame ratio's denominator; empty until measured, or without them)
        self.ratio_references: dict[str, float] = {}
        #: each constraint's pretrained loss on the reference's frames (empty until measured)
        self.references: dict[str, float] = {}
        #: the configured coefficients, captured at setup
        self.base_coeffs: dict[str, float | None] | None = None
        #: the replayed dataset's active loss components
        self.components: list[str] = []
        #: each constraint's loss on the reference's frames over its reference (or the
        #: limit), measured when training ends (empty until then)
        self.final_ratios: dict[str, float] = {}

    @property
    def dual(self) -> DualAscentMultiplier:
        """The multiplier of the budget on the replay loss (not with ``each_component``:
        :attr:`duals`)."""
        if self.each_component:
            raise AttributeError(
                f"{_WHO}(each_component=True) has one multiplier a component: `duals`"
            )
        return self.duals[_ALL]

    @property
    def reference(self) -> float | None:
        """The pretrained model's replay loss (``None`` until measured; with
        ``each_component``, each component's: :attr:`references`)."""
        return None if self.each_component else self.references.get(_ALL)

    @property
    def ratio_reference(self) -> float | None:
        return None if self.each_component else self.ratio_references.get(_ALL)

    @property
    def final_ratio(self) -> float | None:
        """When training ended, the replay loss on the reference's frames over its reference
        (the largest of the components', with ``each_component``; ``None`` until then)."""
        return max(self.final_ratios.values()) if self.final_ratios else None

    @property
    def state_key(self) -> str:
        return f"{_WHO}[{self.dataset}]"

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the dataset, the loss and the module before any step."""
        if stage != "fit":
            return
        manager = loss_manager(pl_module, _WHO)
        check_coeff_writer_allowed(pl_module, _WHO)
        single_adaptive_callback(trainer, self, WeightingCallback)
        no_coefficient_schedule(
            trainer, f"{_WHO} sets the replay coefficients at every step from the configured "
            "ones and would overwrite a schedule's; remove the coefficient scheduler or the "
            "budget"
        )  # fmt: skip
        names = list(getattr(trainer.datamodule, "dataset_names", None) or [])
        if not names:
            raise ValueError(
                f"{_WHO}(dataset={self.dataset!r}) needs several training datasets: use "
                "nequip_mtl.data.MultiDatasetDataModule as `data`"
            )
        if self.dataset not in names:
            raise ValueError(
                f"{_WHO}.dataset is {self.dataset!r}, which is not one of the data module's "
                f"datasets {names}"
            )
        if len(names) < 2:
            raise ValueError(
                f"{_WHO}.dataset {self.dataset!r} is the only training dataset: a budget "
                "trades a replayed dataset against new data; add the new data to `data.datasets`"
            )
        coeffs = current_coeffs(manager)
        fields = {name: entry.field for name, entry in manager.entries.items()}
        mine = [n for n, f in fields.items() if getattr(f, "dataset", None) == self.dataset]
        self.components = [n for n in mine if coeffs[n] is not None]
        if not self.components:
            raise ValueError(
                f"{_WHO}.dataset {self.dataset!r} is not replayed: `training_module.loss` has "
                f"no active component of it (its components: {mine or 'none'}); build the "
                "loss with nequip_mtl.train.PerDatasetLoss listing the dataset"
            )
        if self.each_component:
            short = {n: n.split("/", 1)[-1] for n in self.components}
            self.groups = {short[n]: [n] for n in self.components}
            for g in self.groups:
                self.duals.setdefault(g, DualAscentMultiplier(**self._controller))
        else:
            self.groups = {_ALL: list(self.components)}
        others = [n for n, c in coeffs.items() if c and n not in self.components]
        if not others:
            raise ValueError(
                f"{_WHO}: every active loss component is of {self.dataset!r}; the budget needs "
                "new data to trade against"
            )
        if self.limit is None and _pseudolabelled(trainer.datamodule, self.dataset):
            raise ValueError(
                f"{_WHO}(dataset={self.dataset!r}, tolerance={self.tolerance}): the dataset is "
                "pseudolabelled (nequip_mtl.data.PseudolabelledDataset): its labels are the "
                "pretrained model's own predictions, so the pretrained model's loss on it, the "
                "reference of a relative budget, is zero; give an absolute `limit` instead of "
                "`tolerance`"
            )
        if self.base_coeffs is None:
            self.base_coeffs = coeffs

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Measure the reference (once: a restored callback keeps its own)."""
        # the measurements' own copy of the loss, taken before any step (a training step
        # leaves tensors of its graph in the module's, which cannot be copied)
        self._meter = copy.deepcopy(pl_module.loss)
        # the paired batch losses' own copy, synchronised over ranks as the loss is
        self._pair_meter = copy.deepcopy(self._meter) if self.paired else None
        for metric in self._meter.modules():
            if hasattr(metric, "dist_sync_on_step"):
                metric.dist_sync_on_step = False  # every rank measures the same frames
        self._batches: dict[int, list[dict]] = {}  # the measured frames, batched once
        if self.limit is not None:  # ratios: loss over the limit
            self.references = {g: self.limit for g in self.groups}
            self.ratio_references = dict(self.references)
            return
        if self.ratio_frames is not None and self.references and not self.ratio_references:
            raise ValueError(
                f"{_WHO}(ratio_frames={self.ratio_frames}): the checkpoint's budget measured its "
                "ratio on training batches, so the pretrained model's loss on fixed frames was "
                "never measured; resume with `ratio_frames: null` (or start a new fine-tune)"
            )
        if self.paired and self.references and self.pretrained is None:
            raise ValueError(
                f"{_WHO}(paired=True): the checkpoint's budget did not record the pretrained "
                "model's predictions on the replayed frames, and they cannot be recorded any "
                "more; resume with `paired: false` (or start a new fine-tune)"
            )
        if self.paired and self.pretrained is None:
            self.pretrained = self._record_predictions(trainer, pl_module)
        if not self.references:  # paired: from the predictions just recorded (no forward)
            self.references = self._measure_replay_losses(trainer, pl_module, recorded=self.paired)
            if self.ratio_frames is not None:  # the reference itself, on the same frames
                same = self._count(trainer, self.ratio_frames) == self._count(trainer)
                self.ratio_references = (
                    dict(self.references)
                    if same
                    else self._measure_replay_losses(trainer, pl_module, self.ratio_frames)
                )
            for group, value in [*self.references.items(), *self.ratio_references.items()]:
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(
                        f"{_WHO}: the pretrained model's loss on dataset {self.dataset!r} is "
                        f"{value!r}{'' if group == _ALL else f' ({group})'}; a budget relative "
                        "to it needs a finite, positive value"
                    )

    def _replay_losses(self, values: dict[str, Any]) -> dict[str, float]:
        """Each constraint's weighted combination of its components' values (configured
        coefficients)."""
        out = {}
        for group, names in self.groups.items():
            total = 0.0
            for name in names:
                value = values.get(name)
                value = math.nan if value is None else float(value)
                total += self.base_coeffs[name] * value
            out[group] = total
        return out

    def _prefix(self, group: str) -> str:
        """The logged name's stem of a constraint: ``budget/<dataset>`` (and ``/<component>``)."""
        return f"budget/{self.dataset}" + ("" if group == _ALL else f"/{group}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Measure the trained model's replay loss on the reference's frames."""
        losses = self._measure_replay_losses(trainer, pl_module)
        self.final_ratios = {g: losses[g] / self.references[g] for g in self.groups}
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self._prefix(g)}/final_ratio": r for g, r in self.final_ratios.items()},
                step=trainer.global_step,
            )

    def _count(self, trainer: Any, frames: int | None = None) -> int:
        """How many frames a measurement of the first ``frames`` (default
        ``reference_frames``) of the replayed training split takes: all, if it has fewer."""
        dataset = _training_split(trainer.datamodule, self.dataset)
        return min(len(dataset), self.reference_frames if frames is None else frames)

    def _split_batches(self, trainer: Any, pl_module: Any, count: int):
        """The first ``count`` frames of the replayed training split, in batches of
        ``reference_batch_size`` on the model's device (made as they are iterated)."""
        dataset = _training_split(trainer.datamodule, self.dataset)
        for start in range(0, count, self.reference_batch_size):
            frames = [
                dataset[i] for i in range(start, min(start + self.reference_batch_size, count))
            ]
            batch = AtomicDataDict.batched_from_list(frames)
            yield {k: v.to(pl_module.device) for k, v in batch.items()}

    def _frame_batches(self, trainer: Any, pl_module: Any, count: int) -> list[dict]:
        """:meth:`_split_batches`, kept (batched once per fit: measured at every update)."""
        if count not in self._batches:
            self._batches[count] = list(self._split_batches(trainer, pl_module, count))
        return self._batches[count]

    def _measure_replay_losses(
        self, trainer: Any, pl_module: Any, frames: int | None = None, recorded: bool = False
    ) -> dict[str, float]:
        """Each constraint's replay loss (configured coefficients) for the model on the
        first ``frames`` (default ``reference_frames``) frames of the replayed training
        split; ``recorded``: the pretrained model's, from its recorded predictions."""
        manager = self._meter
        manager.reset()
        with torch.no_grad():  # the model computes its forces with autograd itself
            for batch in self._frame_batches(trainer, pl_module, self._count(trainer, frames)):
                target = pl_module.process_target(batch, 0)  # a copy (nequip's)
                if recorded:  # every frame here is a replayed one
                    rows = torch.ones_like(target[DATASET_INDEX_KEY].reshape(-1), dtype=torch.bool)
                    output = self.pretrained.substitute(target, rows)
                else:
                    output = pl_module(dict(batch))  # the model may add keys to its input
                manager(output, target)
        values = {name: float(v) for name, v in manager.compute().items()}
        return self._replay_losses(values)

    def _record_predictions(self, trainer: Any, pl_module: Any) -> FramePredictions:
        """The model's predictions on every frame of the replayed training split (each
        is drawn in some batch); batched as the measurements are, not kept."""
        count = len(_training_split(trainer.datamodule, self.dataset))

        def pairs():
            with torch.no_grad():  # the model computes its forces with autograd itself
                for batch in self._split_batches(trainer, pl_module, count):
                    yield batch, pl_module(dict(batch))

        return FramePredictions.record(pairs())

    def _pretrained_batch_losses(
        self, trainer: Any, pl_module: Any, batch: Any, idx: int
    ) -> dict[str, float]:
        """Each constraint's pretrained replay loss (configured coefficients) on the replayed
        frames of this batch: its recorded predictions against the batch's labels, through
        the loss's own metrics (synchronised over ranks as the loss is)."""
        target = pl_module.process_target(batch, idx)
        position = trainer.datamodule.dataset_names.index(self.dataset)
        rows = target[DATASET_INDEX_KEY].reshape(-1) == position
        meter = self._pair_meter
        meter.reset()
        with torch.no_grad():
            meter(self.pretrained.substitute(target, rows), target)
        return self._replay_losses(meter.metrics_values_step)

    # ------------------------------------------------------------------ steps

    def _window_start(self, trainer: Any, pl_module: Any) -> None:
        # sampled replay: replayed that often, each weight over it (the same in expectation)
        self.replay_probability = (
            min(1.0, max(d.multiplier for d in self.duals.values())) if self.sample_replay else 1.0
        )
        scale = {
            n: self.duals[g].multiplier / self.replay_probability
            for g, names in self.groups.items()
            for n in names
        }
        coeffs = {
            n: (c * scale[n] if n in scale and c is not None else c)
            for n, c in self.base_coeffs.items()
        }
        update_coeffs(pl_module.loss, coeffs, f"{_WHO}(dataset={self.dataset!r})")

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """"""
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # the draw, the same on every rank (a rank whose batch is all replay keeps it, but
        # does not observe it either: every rank observes, and synchronises, alike)
        self._dropped = self.replay_probability < 1.0 and self._draw(trainer.global_step, batch_idx)
        if self._dropped:
            _drop_dataset(batch, trainer.datamodule.dataset_names.index(self.dataset))

    def _draw(self, step: int, batch_idx: int) -> bool:
        """Whether the micro-batch ``batch_idx`` of optimizer step ``step`` drops its replayed
        frames: a uniform draw of its own (a function of the seed, the step and the batch
        only) at or above :attr:`replay_probability`."""
        draw = random.Random(f"{self.seed}:{step}:{batch_idx}").random()
        return draw >= self.replay_probability

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """"""
        # nequip syncs the loss on every step (`dist_sync_on_step`): its step values are
        # global-batch means, so every rank observes the same ratio without a collective
        if self._dropped:  # no replayed frame trained: nothing of the batch to observe
            pass
        elif self.paired:  # this batch's replay loss over the pretrained model's, on its frames
            losses = self._replay_losses(pl_module.loss.metrics_values_step)
            before = self._pretrained_batch_losses(trainer, pl_module, batch, batch_idx)
            for g, dual in self.duals.items():
                if before[g] > 0:  # weighted by it: the window's ratio of summed losses
                    dual.observe(losses[g] / before[g], weight=before[g])
        elif self.ratio_frames is None:
            losses = self._replay_losses(pl_module.loss.metrics_values_step)
            for g, dual in self.duals.items():
                dual.observe(losses[g] / self.references[g])
        if self._optimizer_stepped(trainer):
            if self.ratio_frames is not None and self._any_dual().next_step_updates:
                # an update step: the ratio measured on the fixed frames (the same on every
                # rank: the model is; no collective)
                losses = self._measure_replay_losses(trainer, pl_module, self.ratio_frames)
                for g, dual in self.duals.items():
                    dual.observe(losses[g] / self.ratio_references[g])
            for g, dual in self.duals.items():
                dual.step()
                pl_module.log(f"{self._prefix(g)}/multiplier", dual.multiplier)
                pl_module.log(f"{self._prefix(g)}/limit", dual.bound)
                if math.isfinite(dual.last_ratio):  # after the first update
                    pl_module.log(f"{self._prefix(g)}/ratio", dual.last_ratio)
            if self.sample_replay:
                pl_module.log(f"budget/{self.dataset}/replay_probability", self.replay_probability)

    def _any_dual(self) -> DualAscentMultiplier:
        """One of the multipliers (they update on the same steps)."""
        return next(iter(self.duals.values()))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """"""
        return {
            "duals": {g: d.state_dict() for g, d in self.duals.items()},
            "references": dict(self.references),
            "ratio_references": dict(self.ratio_references),
            "base_coeffs": None if self.base_coeffs is None else dict(self.base_coeffs),
            "final_ratios": dict(self.final_ratios),
            "pretrained": None if self.pretrained is None else self.pretrained.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """"""
        if "dual" in state_dict:  # a budget's state from before `each_component`
            state_dict = _one_constraint_state(state_dict)
        saved = set(state_dict["duals"])
        if saved != set(self.duals):
            raise ValueError(
                f"{_WHO}: the checkpoint's budget bounds {sorted(saved)}, this one "
                f"{sorted(self.duals)} (each_component={self.each_component}); resume with the "
                "checkpoint's setting"
            )
        for g, dual in self.duals.items():
            dual.load_state_dict(state_dict["duals"][g])
        self.references = dict(state_dict["references"])
        self.ratio_references = dict(state_dict["ratio_references"])
        base = state_dict["base_coeffs"]
        self.base_coeffs = None if base is None else dict(base)
        self.final_ratios = dict(state_dict["final_ratios"])
        pretrained = state_dict.get("pretrained")
        self.pretrained = (
            None if pretrained is None else FramePredictions.from_state_dict(pretrained)
        )


def _drop_dataset(batch: dict, position: int) -> bool:
    """Remove the frames of dataset ``position`` from ``batch`` in place (the training step
    reads the same dict); a batch of those frames only is left as it is. Returns whether
    frames were removed."""
    rows = batch[DATASET_INDEX_KEY].reshape(-1) != position
    if bool(rows.all()) or not bool(rows.any()):
        return False
    kept = select_frames(batch, rows.nonzero().reshape(-1))
    batch.clear()
    batch.update(kept)
    return True


def _one_constraint_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state saved with one multiplier (``dual``, ``reference``, ...), as the per-constraint
    one of a budget on the replay loss."""

    def one(value):
        return {} if value is None else {_ALL: value}

    return {
        "duals": {_ALL: state["dual"]},
        "references": one(state["reference"]),
        "ratio_references": one(state.get("ratio_reference")),
        "base_coeffs": state["base_coeffs"],
        "final_ratios": one(state.get("final_ratio")),
        "pretrained": state.get("pretrained"),
    }


def _training_split(datamodule: Any, dataset: str) -> Any:
    """The data module's training split of ``dataset`` (set up: Lightning sets up the data
    module before the callbacks)."""
    position = datamodule.dataset_names.index(dataset)
    (split,) = [d for d in datamodule.train_dataset if getattr(d, "index", None) == position]
    return split


def _pseudolabelled(datamodule: Any, dataset: str) -> bool:
    """Whether the training split of ``dataset`` is made of pseudolabels, through its
    split and wrappers."""
    from ...data.pseudolabels import PseudolabelledDataset

    inner = _training_split(datamodule, dataset)
    while inner is not None:
        if isinstance(inner, PseudolabelledDataset):
            return True
        inner = getattr(inner, "dataset", None)
    return False
