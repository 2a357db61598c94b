"""The method registry: every way of training a study can run, by name, selected exactly
as a user would in a nequip config (the ``_target_`` of the training module, its
``aggregator`` or a callback); :func:`missing_methods` names any that does not import.

A method as it would stand in a nequip config (``methods()["upgrad_k8"]``)::

    training_module:
      _target_: nequip_mtl.train.MultitaskLightningModule
      aggregator:
        _target_: nequip_mtl.aggregators.UPGrad
      weights_every: 8

No torch or Lightning import here (the table is read by ``--help`` and ``--from-json``).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to train: a training module (+ kwargs) and optional callbacks."""

    label: str
    module: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    callbacks: tuple[dict[str, Any], ...] = ()
    optimizer: dict[str, Any] | None = None  # None: the benchmark's default (Adam)
    baseline: bool = False  # one of nequip's built-in choices
    family: str = "aggregator"  # baseline | aggregator | weighting
    #: energy and force loss coefficients (stress follows energy); ``None``: 1 each
    coeffs: dict[str, float] | None = None
    #: from the first epoch after ``at`` x the budget, ``LossCoefficientScheduler`` -> ``coeffs``
    two_stage: dict[str, Any] | None = None
    #: fine-tuning: the replayed data's coefficient over the new data's (``None``: no replay)
    replay: float | None = None
    #: multi-fidelity: ``{"mode": "high_only" | "pretrain" | "joint", "high": w (the
    #: high-fidelity loss coefficient, the low one's 1), "heads": bool, "embedding": bool}``
    fidelity: dict[str, Any] | None = None
    #: the run's clock budget in units of ``--budget-s`` (a sweep of K runs: K)
    budget_factor: float = 1.0
    #: fine-tuning: the replayed data labelled by the pretrained model itself
    #: (``nequip_mtl.data.PseudolabelledDataset``) instead of its own labels
    pseudolabels: bool = False

    def targets(self) -> list[str]:
        out = [self.module]
        agg = self.kwargs.get("aggregator")
        if agg:
            out.append(agg["_target_"])
        out += [cb["_target_"] for cb in self.callbacks]
        if self.pseudolabels:
            out.append(PSEUDOLABELS)
        return out

    def with_seed(self, seed: int) -> Method:
        """This method with ``seed`` for its seeded callbacks (``RandomLossWeighting``)."""
        if not any("RandomLossWeighting" in cb["_target_"] for cb in self.callbacks):
            return self
        callbacks = tuple({**cb, "seed": seed} if "RandomLossWeighting" in cb["_target_"] else cb
                          for cb in self.callbacks)  # fmt: skip
        return dataclasses.replace(self, callbacks=callbacks)


PLAIN = "nequip.train.NequIPLightningModule"
MTL = "nequip_mtl.train.MultitaskLightningModule"
PSEUDOLABELS = "nequip_mtl.data.pseudolabels.PseudolabelledDataset"


def _agg(name: str, label: str, **kw) -> Method:
    return Method(label, MTL, {"aggregator": {"_target_": f"nequip_mtl.aggregators.{name}", **kw}})


def _baseline(label: str, module: str = PLAIN, **kw) -> Method:
    return Method(label, module, baseline=True, family="baseline", **kw)


def _weighting(label: str, module: str = PLAIN, **kw) -> Method:
    return Method(label, module, family="weighting", **kw)


def _methods(interval: str) -> dict[str, Method]:
    """All methods; ``interval`` is the update interval of the loss-weighting callbacks."""
    softadapt = {"beta": 1.1, "interval": interval, "frequency": 2}
    mconfig = "nequip_mtl.aggregators.MomentumConFIG"
    return {
        # --- nequip's built-in choices (the baselines)
        "ws": _baseline("weighted sum (nequip)"),
        "config_nequip": _baseline("ConFIG (nequip)", "nequip.train.ConFIGLightningModule"),
        "softadapt_nequip": _baseline("SoftAdapt (nequip)", callbacks=(
            {"_target_": "nequip.train.callbacks.SoftAdapt", **softadapt},)),
        # --- gradient aggregation (nequip_mtl)
        "config": Method("ConFIG (nequip_mtl)", "nequip_mtl.train.ConFIGLightningModule"),
        "mean": _agg("Mean", "Mean"),
        "sum": _agg("Sum", "Sum"),
        "pcgrad": _agg("PCGrad", "PCGrad"),
        "imtlg": _agg("IMTLG", "IMTL-G"),
        "mgda": _agg("MGDA", "MGDA"),
        "upgrad": _agg("UPGrad", "UPGrad"),
        "dualproj": _agg("DualProj", "DualProj"),
        "alignedmtl": _agg("AlignedMTL", "Aligned-MTL"),
        "cagrad": _agg("CAGrad", "CAGrad"),
        "mconfig_adam": Method("M-ConFIG + Adam (no 2nd moment)", MTL,
                               {"aggregator": {"_target_": mconfig, "second_moment": False}}),
        "mconfig_adam0": Method(
            "M-ConFIG + Adam(beta1=0) (no 2nd moment)", MTL,
            {"aggregator": {"_target_": "nequip_mtl.aggregators.momentum_config.MomentumConFIG",
                            "second_moment": False}},
            # the aggregator already averages the gradients: no second momentum in Adam
            optimizer={"_target_": "torch.optim.Adam", "betas": [0.0, 0.999]},
        ),
        "mconfig_sgd": Method("M-ConFIG + SGD (2nd moment)", MTL,
                              {"aggregator": {"_target_": mconfig, "second_moment": True}},
                              optimizer={"_target_": "torch.optim.SGD"}),
        # --- loss weighting (nequip_mtl)
        "uncertainty": _weighting("Uncertainty weighting",
                                  "nequip_mtl.train.UncertaintyWeightingLightningModule"),
        "famo": _weighting("FAMO", "nequip_mtl.train.FAMOLightningModule"),
        "softadapt": _weighting("SoftAdapt (nequip_mtl)", callbacks=(
            {"_target_": "nequip_mtl.train.callbacks.SoftAdapt", **softadapt},)),
        "dwa": _weighting("DWA", callbacks=(
            {"_target_": "nequip_mtl.train.callbacks.DynamicWeightAverage", "temperature": 2.0,
             "interval": interval, "frequency": 1},)),
        "rlw": _weighting("RLW", callbacks=(
            {"_target_": "nequip_mtl.train.callbacks.RandomLossWeighting", "interval": "batch",
             "frequency": 1, "seed": 0},)),
    }  # fmt: skip


#: energy:force ratios of the swept weighted sum (``ws`` itself is 1:1)
WS_RATIOS = {"ws_e100": (100, 1), "ws_e10": (10, 1), "ws_f10": (1, 10), "ws_f100": (1, 100)}


def _weighted_sums() -> dict[str, Method]:
    """nequip's plain weighted sum at other energy:force(:stress) ratios, and the MACE-style
    two-stage schedule (forces 100x energy, then energy 10x forces for the last quarter)."""
    out = {
        name: _baseline(f"weighted sum {e}:{f}", coeffs={"total_energy": float(e), "forces": float(f)})
        for name, (e, f) in WS_RATIOS.items()
    }  # fmt: skip
    out["ws_two_stage"] = _baseline(
        "weighted sum 1:100, then 10:1", coeffs={"total_energy": 1.0, "forces": 100.0},
        two_stage={"at": 0.75, "coeffs": {"total_energy": 10.0, "forces": 1.0}},
    )  # fmt: skip
    return out


#: the loss metric names of nequip's EnergyForce(Stress)Loss with per_atom_energy
LOSS_METRIC_NAMES = {"total_energy": "per_atom_energy_mse", "forces": "forces_mse",
                     "stress": "stress_mse"}  # fmt: skip


def task_coeffs(coeffs: dict[str, float] | None, num_tasks: int) -> dict[str, float] | None:
    """Energy/force coefficients expanded to the data set's tasks (stress = energy's)."""
    if coeffs is None:
        return None
    out = {"total_energy": coeffs["total_energy"], "forces": coeffs["forces"]}
    if num_tasks == 3:
        out["stress"] = coeffs["total_energy"]
    return out


def second_stage_coeffs(method: Method, num_tasks: int) -> dict[str, float]:
    """The second stage's coefficients by loss metric name (LossCoefficientScheduler's keys)."""
    coeffs = task_coeffs(method.two_stage["coeffs"], num_tasks)
    return {LOSS_METRIC_NAMES[k]: v for k, v in coeffs.items()}


#: the Gram-based aggregation methods that take ``weights_every``
GRAM_METHODS = [
    "config", "mean", "sum", "pcgrad", "imtlg", "mgda", "upgrad", "dualproj", "alignedmtl", "cagrad"
]  # fmt: skip
PERIODS = (2, 4, 8, 16)


def _periodic(table: dict[str, Method]) -> dict[str, Method]:
    """``<method>_k<k>``: the method with ``weights_every: k``."""
    out = {}
    for name in GRAM_METHODS:
        m = table[name]
        for k in PERIODS:
            out[f"{name}_k{k}"] = dataclasses.replace(
                m, label=f"{m.label}, every {k}", kwargs={**m.kwargs, "weights_every": k}
            )
    return out


def _calibrated(steps: int) -> dict[str, Method]:
    """Calibrate-then-freeze on nequip's plain module (``gradnorm`` and UPGrad's weights)."""
    cb = "nequip_mtl.train.callbacks.CalibrateLossCoefficients"
    upgrad = {"_target_": "nequip_mtl.aggregators.UPGrad"}
    return {
        "calib_gradnorm": _weighting("calibrate-then-freeze (gradnorm)", callbacks=(
            {"_target_": cb, "steps": steps, "rule": "gradnorm"},)),
        "calib_upgrad": _weighting("calibrate-then-freeze (UPGrad weights)", callbacks=(
            {"_target_": cb, "steps": steps, "rule": "aggregator", "aggregator": upgrad},)),
    }  # fmt: skip


def methods(interval: str = "epoch", calibration_steps: int = 20) -> dict[str, Method]:
    """Every method; the calibrate-then-freeze ones calibrate for ``calibration_steps``."""
    table = _methods(interval)
    return {**table, **_weighted_sums(), **_calibrated(calibration_steps), **_periodic(table)}


#: fine-tuning: the swept replay coefficients (the pretraining data's, the new data's is 1)
REPLAY_WEIGHTS = (0.3, 1.0, 3.0, 10.0)
#: ... of earlier results (their jsons name ``ft_replay_0.1``): still built, not run by default
LEGACY_REPLAY_WEIGHTS = (0.1,)
#: fine-tuning: the replay coefficients of pseudolabel replay
PSEUDO_WEIGHTS = (1.0, 3.0)


def finetune_methods(calibration_steps: int = 20) -> dict[str, Method]:
    """The fine-tuning strategies (``benchmarks/finetune.py``): the new data alone, replay
    with nequip's weighted sum at the :data:`REPLAY_WEIGHTS` (``ft_replay_<w>``; and at the
    :data:`LEGACY_REPLAY_WEIGHTS`), the same with the replayed structures labelled by the
    pretrained model at the :data:`PSEUDO_WEIGHTS` (``ft_pseudo_<w>``), replay with the
    datasets as tasks (:func:`_dataset_tasks`, primary ``new``), or with a forgetting budget
    (:func:`_budgets`)."""
    out = {"ft_naive": _baseline("naive: new data only (weighted sum)")}
    for w in (*REPLAY_WEIGHTS, *LEGACY_REPLAY_WEIGHTS):
        out[f"ft_replay_{w:g}"] = _baseline(f"replay, weighted sum {w:g}:1", replay=w)
    # a guessed weight given the sweep's total time: what a long budget run is beside
    out["ft_long_replay_1"] = _weighting(
        "replay, weighted sum 1:1, the sweep's total time", replay=1.0,
        budget_factor=float(len(REPLAY_WEIGHTS)),
    )  # fmt: skip
    for w in PSEUDO_WEIGHTS:
        out[f"ft_pseudo_{w:g}"] = _baseline(
            f"pseudolabel replay, weighted sum {w:g}:1", replay=w, pseudolabels=True
        )
    out.update(_dataset_tasks("ft", "replay, ", "new", calibration_steps, replay=1.0))
    out.update(_budgets())
    return out


#: fine-tuning: the forgetting budgets' tolerances (relative rise of the replayed loss)
BUDGET_TOLERANCES = (0.05, 0.25)


#: the PI controller's gains (set before any measurement: a slower integral than plain dual
#: ascent's 1.0 and a proportional term of the same order)
PI_BUDGET = {"step_size": 0.3, "proportional": 1.0}


#: the frames the study's budgets measure their reference on
REFERENCE_FRAMES = 64
#: the budget whose ratio is measured on fixed frames (``ratio_frames``), not batches: on
#: half of the reference's frames, and on all of them
FRAMES_BUDGET = {"ratio_frames": REFERENCE_FRAMES // 2}
REFERENCE_BUDGET = {"ratio_frames": REFERENCE_FRAMES}
#: the same, updated (and measured) every 10 steps, the callback's default, not the study's 5:
#: half the measurements
REFERENCE_BUDGET_10 = {"ratio_frames": REFERENCE_FRAMES, "every": 10}
#: and every 20 steps: half those measurements again
REFERENCE_BUDGET_20 = {"ratio_frames": REFERENCE_FRAMES, "every": 20}
#: each batch's replay loss over the pretrained model's on the same frames (``paired``; no
#: measurement during training), updated every 10 steps
PAIRED_BUDGET = {"paired": True, "every": 10}
#: a bound on each replayed component (energy, forces) with its own multiplier, measured as
#: :data:`REFERENCE_BUDGET_10`
EACH_BUDGET = {**REFERENCE_BUDGET_10, "each_component": True}
#: replay sampled with the multiplier's odds below 1 (``sample_replay``), measured as
#: :data:`REFERENCE_BUDGET_10` or :data:`REFERENCE_BUDGET_20`
SAMPLED_BUDGET_10 = {**REFERENCE_BUDGET_10, "sample_replay": True}
SAMPLED_BUDGET_20 = {**REFERENCE_BUDGET_20, "sample_replay": True}
#: :data:`REFERENCE_BUDGET_20` with the multiplier starting at the sweep's lowest weight
#: instead of 1 (a diagnostic: does the multiplier's early path cost the new data?)
LOW_START_BUDGET_20 = {**REFERENCE_BUDGET_20, "initial": 0.3}
#: dual ascent's textbook start, near zero (fine-tuning alone: the multiplier rises as
#: forgetting appears), with replay sampled, so that a low multiplier costs little
NEAR_ZERO_START_BUDGET_20 = {**SAMPLED_BUDGET_20, "initial": 0.01}


def _budget_callback(tolerance: float, **controller) -> dict[str, Any]:
    """The ``ForgettingBudget`` config of the fine-tuning study: the replayed dataset
    ``pretrain`` within ``tolerance``, updated every 5 steps, its reference on 64 frames, the
    ratio of each batch over that reference (unpaired: the study's first budgets, from
    before the paired ratio was the default); ``controller``: further options
    (:data:`PI_BUDGET`, :data:`PAIRED_BUDGET`)."""
    config = {"_target_": "nequip_mtl.train.callbacks.ForgettingBudget", "dataset": "pretrain",
              "tolerance": tolerance, "every": 5, "reference_frames": REFERENCE_FRAMES,
              **controller}  # fmt: skip
    if "ratio_frames" not in config:  # from the batches (the callback's default measures)
        config["ratio_frames"] = None
        config.setdefault("paired", False)
    return config


def _budgets() -> dict[str, Method]:
    """Replay at 1:1 with a ``ForgettingBudget`` (``ft_budget_<tol>``), the same given the
    whole replay sweep's time (``_sweep``: a sweep of K weights costs K runs), and with the
    multiplier a PI controller (``ft_budget_pi_<tol>``, :data:`PI_BUDGET`) or the ratio
    measured on fixed frames (``ft_budget_frames_<tol>``, :data:`FRAMES_BUDGET`: half the
    reference's; ``ft_budget_ref_<tol>``, :data:`REFERENCE_BUDGET`: all of them, the final
    ratio's own frames; ``ft_budget_ref10_<tol>``, ``_ref20_``: the same every 10 or 20
    steps; ``ft_budget_ref10_<tol>_sweep``: every 10, given the sweep's time), with a
    bound on each component (``ft_budget_each_<tol>``, :data:`EACH_BUDGET`), with replay
    sampled with the multiplier's odds (``ft_budget_sampled10_<tol>``,
    ``_sampled20_``, :data:`SAMPLED_BUDGET_10`, :data:`SAMPLED_BUDGET_20`), with the
    multiplier starting at 0.3 (``ft_budget_from0.3_<tol>``, :data:`LOW_START_BUDGET_20`)
    or at 0.01 with replay sampled (``ft_budget_from0.01_<tol>``,
    :data:`NEAR_ZERO_START_BUDGET_20`),
    or on each batch against the pretrained model's loss on its frames
    (``ft_budget_paired_<tol>``, :data:`PAIRED_BUDGET`)."""
    out = {}
    for tol, (suffix, factor) in itertools.product(
        BUDGET_TOLERANCES, (("", 1.0), ("_sweep", float(len(REPLAY_WEIGHTS))))
    ):
        cb = _budget_callback(tol)
        label = f"replay with a forgetting budget (+{tol:.0%})" + (
            ", the sweep's total time" if suffix else ""
        )
        out[f"ft_budget_{tol:g}{suffix}"] = _weighting(
            label, callbacks=(cb,), replay=1.0, budget_factor=factor
        )
    for tol, (key, name, controller) in itertools.product(BUDGET_TOLERANCES, (
        ("pi", "PI controller", PI_BUDGET),
        ("frames", f"ratio on {FRAMES_BUDGET['ratio_frames']} fixed frames", FRAMES_BUDGET),
        ("ref", "ratio on the reference's frames", REFERENCE_BUDGET),
        ("ref10", "ratio on the reference's frames every 10 steps", REFERENCE_BUDGET_10),
        ("ref20", "ratio on the reference's frames every 20 steps", REFERENCE_BUDGET_20),
        ("paired", "each batch paired with the pretrained model's loss on it", PAIRED_BUDGET),
        ("each", "each component bounded, on the reference's frames every 10 steps", EACH_BUDGET),
        ("sampled10", "replay sampled, on the reference's frames every 10 steps",
         SAMPLED_BUDGET_10),
        ("sampled20", "replay sampled, on the reference's frames every 20 steps",
         SAMPLED_BUDGET_20),
        ("from0.3", "starting at 0.3, on the reference's frames every 20 steps",
         LOW_START_BUDGET_20),
        ("from0.01", "starting at 0.01, replay sampled, on the reference's frames every "
         "20 steps", NEAR_ZERO_START_BUDGET_20),
    )):  # at one run's time  # fmt: skip
        out[f"ft_budget_{key}_{tol:g}"] = _weighting(
            f"replay with a forgetting budget (+{tol:.0%}), {name}",
            callbacks=(_budget_callback(tol, **controller),), replay=1.0,
        )  # fmt: skip
    for tol in BUDGET_TOLERANCES:  # the callback's default measurement, at the sweep's time
        out[f"ft_budget_ref10_{tol:g}_sweep"] = _weighting(
            f"replay with a forgetting budget (+{tol:.0%}), ratio on the reference's frames "
            "every 10 steps, the sweep's total time",
            callbacks=(_budget_callback(tol, **REFERENCE_BUDGET_10),), replay=1.0,
            budget_factor=float(len(REPLAY_WEIGHTS)),
        )  # fmt: skip
    return out


def _dataset_tasks(prefix: str, what: str, primary: str, calibration_steps: int, **kw):
    """Two datasets as tasks on a 1:1 per-dataset loss (``tasks: datasets``): UPGrad,
    PCGrad and ``PrimaryConstrained`` (``primary``) as ``<prefix>_upgrad``, ``_pcgrad``,
    ``_primary``; calibrate-then-freeze (UPGrad weights) on nequip's module as
    ``<prefix>_calib``. ``what`` starts the labels; ``kw``: further :class:`Method` fields."""
    out = {}
    for key, name, label, agg in (
        ("upgrad", "UPGrad", "UPGrad", {}),
        ("pcgrad", "PCGrad", "PCGrad", {}),
        ("primary", "PrimaryConstrained", f"PrimaryConstrained (primary {primary})",
         {"primary": primary}),
    ):  # fmt: skip
        m = _agg(name, f"{what}dataset tasks, {label}", **agg)
        out[f"{prefix}_{key}"] = dataclasses.replace(
            m, kwargs={**m.kwargs, "tasks": "datasets"}, **kw
        )
    calib = _calibrated(calibration_steps)["calib_upgrad"]
    out[f"{prefix}_calib"] = dataclasses.replace(
        calib, label=f"{what}calibrate-then-freeze (UPGrad weights)", **kw
    )
    return out


#: fine-tuning: the replay sweep (the front), every strategy, and those run by default
FT_SWEEP = [f"ft_replay_{w:g}" for w in REPLAY_WEIGHTS]
FT_METHODS = list(finetune_methods())
FT_DEFAULT = [m for m in FT_METHODS
              if m not in {f"ft_replay_{w:g}" for w in LEGACY_REPLAY_WEIGHTS}]  # fmt: skip

#: multi-fidelity: the swept high:low loss coefficient ratios of joint training with
#: references alone (the low fidelity's is 1)
MF_WEIGHTS = (10.0, 3.0, 1.0, 0.3)
#: ... with readout heads or the fidelity embedding (the weight stays: heads do not remove it)
MF_FAMILY_WEIGHTS = (10.0, 3.0, 1.0)
#: the joint families beyond references alone: key prefix, label, ``fidelity`` options
MF_FAMILIES = {"heads": ("per-dataset readout heads", {"heads": True}),
               "trunk": ("fidelity embedding in the trunk", {"embedding": True})}  # fmt: skip


def multifidelity_methods(calibration_steps: int = 20) -> dict[str, Method]:
    """The multi-fidelity strategies (``benchmarks/multifidelity.py``); labels name the two
    levels ``{high}`` and ``{low}`` (the pair's, filled in by the study). The high fidelity
    alone; low-fidelity pretraining then high-fidelity fine-tuning; joint training on the
    per-dataset energy references (``PerDatasetEnergyReferences``) with nequip's weighted sum
    at the high:low ratios :data:`MF_WEIGHTS` (``mf_joint_<w>``), and at
    :data:`MF_FAMILY_WEIGHTS` with per-dataset readout heads (``mf_heads_<w>``) or with the
    fidelity embedding of the trunk (``fidelity_embedding: true``, ``mf_trunk_<w>``); the
    datasets as tasks (:func:`_dataset_tasks`, primary ``high``); ``mf_joint_heads``: heads
    at 1:1 (the label of the committed ``multifidelity.json``, which ran it)."""
    out = {
        "mf_dft_only": _baseline("{high} only (weighted sum)", fidelity={"mode": "high_only"}),
        "mf_pretrain_ft": _baseline("{low} pretraining, then {high} fine-tuning",
                                    fidelity={"mode": "pretrain"}),
    }  # fmt: skip
    joint = {"mode": "joint", "high": 1.0, "heads": False, "embedding": False}
    for w in MF_WEIGHTS:
        out[f"mf_joint_{w:g}"] = _baseline(f"joint, weighted sum {{high}}:{{low}} {w:g}:1",
                                           fidelity={**joint, "high": w})  # fmt: skip
    out.update(_dataset_tasks("mf", "joint, ", "high", calibration_steps, fidelity=joint))
    out["mf_joint_heads"] = _baseline(
        "joint, weighted sum 1:1, per-dataset readout heads", fidelity={**joint, "heads": True}
    )
    for key, (what, options) in MF_FAMILIES.items():
        for w in MF_FAMILY_WEIGHTS:
            out[f"mf_{key}_{w:g}"] = _baseline(
                f"joint, weighted sum {{high}}:{{low}} {w:g}:1, {what}",
                fidelity={**joint, **options, "high": w},
            )
    return out


#: multi-fidelity: the weighted-sum sweep with references alone (the front), every strategy,
#: and the strategies run by default (the dataset tasks were dominated on ``ethanol_random``)
MF_SWEEP = [f"mf_joint_{w:g}" for w in MF_WEIGHTS]
MF_METHODS = list(multifidelity_methods())
MF_DEFAULT = ["mf_dft_only", "mf_pretrain_ft",
              *(f"mf_{k}_{w:g}" for k in ("joint", *MF_FAMILIES) for w in MF_FAMILY_WEIGHTS)]  # fmt: skip


def dataset_task_methods() -> dict[str, Method]:
    """The methods of ``benchmarks/step_cost_datasets.py`` on a per-dataset loss: nequip's
    weighted sum, UPGrad over dataset tasks (sub-batch forwards, or ``forward_per_dataset:
    false``: masked backward passes over the whole batch) or over every component."""
    upgrad = {"aggregator": {"_target_": "nequip_mtl.aggregators.UPGrad"}}
    return {
        "ws": _baseline("weighted sum (nequip)"),
        "upgrad_datasets": Method("UPGrad, tasks: datasets (sub-batch forwards)", MTL,
                                  {**upgrad, "tasks": "datasets"}),
        "upgrad_datasets_masked": Method("UPGrad, tasks: datasets, forward_per_dataset: false",
                                         MTL, {**upgrad, "tasks": "datasets",
                                               "forward_per_dataset": False}),
        "upgrad_components": Method("UPGrad, tasks: components", MTL,
                                    {**upgrad, "tasks": "components"}),
    }  # fmt: skip


#: the methods run when none are named
DEFAULT_METHODS = list(_methods("epoch"))
ALL_METHODS = list(methods("epoch"))


def _resolves(target: str) -> bool:
    module, _, name = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def missing_methods(keys: list[str], table: dict[str, Method]) -> dict[str, list[str]]:
    """``{method: [unresolvable _target_s]}`` for the methods that cannot be built here."""
    out = {}
    for k in keys:
        bad = [t for t in table[k].targets() if not _resolves(t)]
        if bad:
            out[k] = bad
    return out


# ----------------------------------------------------------------------------- selections

#: the two references of the step-cost studies
WS, NEQUIP_CONFIG = "ws", "config_nequip"

#: pareto: the weighted-sum sweep, energy-heavy to force-heavy, then the two-stage schedule
SWEEP = ["ws_e100", "ws_e10", "ws", "ws_f10", "ws_f100"]
TWO_STAGE = "ws_two_stage"
BASELINES = SWEEP + [TWO_STAGE]

#: conflicts: variant -> (method key in :func:`methods`, energy:force ratio r; E:F(:S) = r:1(:r))
VARIANTS = {"ws_100": ("ws", 100.0), "ws_1": ("ws", 1.0), "ws_0.01": ("ws", 0.01),
            "upgrad": ("upgrad", 1.0), "config": ("config", 1.0)}  # fmt: skip


def ratio_text(r: float, num_tasks: int) -> str:
    e, f = (f"{r:g}", "1") if r >= 1 else ("1", f"{1 / r:g}")
    return f"{e}:{f}:{e}" if num_tasks == 3 else f"{e}:{f}"


def variant_label(variant: str, num_tasks: int) -> str:
    key, r = VARIANTS[variant]
    name = {"ws": "weighted sum", "upgrad": "UPGrad", "config": "ConFIG (nequip_mtl)"}[key]
    return f"{name} {'E:F:S' if num_tasks == 3 else 'E:F'} = {ratio_text(r, num_tasks)}"


def short_label(variant: str, num_tasks: int) -> str:
    key, r = VARIANTS[variant]
    name = {"ws": "WS", "upgrad": "UPGrad", "config": "ConFIG"}[key]
    return f"{name}\n{ratio_text(r, num_tasks)}"


def coeffs_for(r: float, num_tasks: int) -> dict[str, float]:
    """The loss coefficients r:1(:r) of a conflict variant."""
    out = {"total_energy": r, "forces": 1.0}
    if num_tasks == 3:
        out["stress"] = r
    return out


def aggregator_classes() -> list[type]:
    """Every aggregator class of ``nequip_mtl.aggregators`` (the aggregation-cost study)."""
    import inspect

    import nequip_mtl.aggregators as aggregators

    classes = [getattr(aggregators, n) for n in aggregators.__all__]
    return [c for c in classes if inspect.isclass(c) and issubclass(c, aggregators.Aggregator)
            and c.__name__ not in ("Aggregator", "GramAggregator")]  # fmt: skip
