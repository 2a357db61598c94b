"""``docs/finetuning.md`` runs as written: pretraining, packaging, fine-tuning with replay,
the per-dataset metrics and the deployed model in ASE.

The page's commands run in the page's order, from a fresh directory that is not the
repository (``$(pwd)/configs`` is read as the repository's ``configs``, every other path
as the page gives it), each with tiny overrides appended (few frames, a 1-layer model,
one or two epochs). ``nequip-train`` runs in this process through nequip's real entry point
(``tests/_nequip_train.py``); every other command runs in bash, ``python`` blocks in a
fresh interpreter. The compile step and its ASE block take minutes on 2 CPU cores and run
in a test marked ``slow``.

What is checked beyond "every command succeeds":

- the fine-tuning run starts from the pretrained weights: the parameters of its model at
  the first training batch are the pretraining checkpoint's, tensor for tensor, and the
  pretrained model evaluated by the fine-tuning config on A's test split gives the
  errors the pretraining run gave on its own test split (the same frames: both data
  modules split A with the same seed);
- both datasets' validation and test metrics are logged under their names;
- the fine-tuned package predicts in ASE, in a process without nequip_mtl and without the
  pretrained package, what the fine-tuned checkpoint predicts, and not what the
  pretrained model predicts.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests._nequip_train import nequip_train
from tests._scripts import console_script
from tests.test_deployment import _assert_same_prediction, _evaluate, _reference

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "finetuning.md"
BIN = Path(sys.executable).parent
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
)

# appended to the page's commands: (pattern the command matches, extra arguments); frame
# counts replace the page's `--frames`
FRAMES = {"data/pretrain.xyz": 12, "data/new.xyz": 10, "data/structures.xyz": 10}
TINY = {
    "--config-name pretrain": [
        "train_split=8",
        "val_split=2",
        "test_split=2",
        "num_layers=1",
        "num_features=4",
        "training_module.model.radial_mlp_width=8",
        "trainer.max_epochs=1",
        "run=[train,test]",
    ],
    "--config-name finetune_replay": [
        "pretrain_train=8",
        "pretrain_val=2",
        "pretrain_test=2",
        "new_train=6",
        "new_val=2",
        "new_test=2",
        "batches_per_epoch=2",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
    ],
    "--config-name finetune_foundation": [
        "structures_train=8",
        "structures_val=2",
        "new_train=6",
        "new_val=2",
        "new_test=2",
        "batches_per_epoch=2",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "budget_every=1",
    ],
}
METRICS = ("per_atom_energy_mae", "forces_mae", "stress_mae")
FINE_TUNE = "--config-name finetune_replay"


def page_steps(text: str) -> list[tuple[str, str]]:
    """``(kind, code)`` of the page in order: ``("bash", one command)`` per command of the
    ```bash blocks (continuations joined, comments dropped), ``("python", block)``."""
    steps = []
    for m in re.finditer(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        kind, code = m.groups()
        if kind == "python":
            steps.append((kind, code))
            continue
        code = re.sub(r"\\\n", " ", code)
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                steps.append((kind, line))
    return steps


def is_slow(step: tuple[str, str]) -> bool:
    return "nequip-compile" in step[1] or ".pt2" in step[1]


def tiny(command: str, launch: Path) -> str:
    command = command.replace("$(pwd)/configs", str(REPO / "configs"))
    command = command.replace("$(pwd)", str(launch)).replace("$PWD", str(launch))
    for path, frames in FRAMES.items():
        if "nequip-mtl-make-data" in command and path in command:
            command = re.sub(r"--frames \d+", f"--frames {frames} -q", command)
    for pattern, extra in TINY.items():
        if "nequip-train" in command and pattern in command:
            command += " " + " ".join(extra)
    return command


class FirstBatchParameters(Callback):
    """The model's parameters at the start of the first training batch."""

    def __init__(self):
        self.params = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.params is None:
            self.params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def make_data(argv: list[str]) -> None:
    """``nequip-mtl-make-data`` in this process: the function its console script calls."""
    assert console_script("nequip-mtl-make-data")(argv) == 0


def train_in_process(argv: list[str], monkeypatch, callbacks=()) -> str:
    """``nequip-train`` (``argv`` after the program name) in this process, with ``callbacks``
    added to its trainer; returns its ``hydra.run.dir``."""
    options, overrides, it = {}, [], iter(argv)
    for arg in it:
        if arg in ("--config-path", "--config-name"):
            options[arg] = next(it)
        else:
            overrides.append(arg)
    run_dir = next(a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir="))
    fit = lightning.Trainer.fit

    def fit_recording(trainer, *args, **kwargs):
        trainer.callbacks.extend(callbacks)
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(lightning.Trainer, "fit", fit_recording)
    try:
        nequip_train(options["--config-path"], options["--config-name"], overrides)
    finally:
        monkeypatch.setattr(lightning.Trainer, "fit", fit)
    return run_dir


def run_step(step: tuple[str, str], launch: Path, monkeypatch, first_batch: dict) -> None:
    """One step of the page in ``launch``: ``nequip-train`` and ``nequip-mtl-make-data`` in
    this process, ``python`` blocks too (``exec``), other commands in bash."""
    kind, code = step
    monkeypatch.chdir(launch)
    if kind == "python":
        exec(compile(code, str(PAGE), "exec"), {"__name__": "__main__"})
        return
    command = tiny(code, launch)
    argv = shlex.split(command)
    argv = argv[1:] if argv[0].startswith("OMP_NUM_THREADS=") else argv
    if argv[0] == "nequip-mtl-make-data":
        make_data(argv[1:])
    elif argv[0] == "nequip-train":
        callback = FirstBatchParameters()
        run_dir = train_in_process(argv[1:], monkeypatch, [callback])
        first_batch[run_dir] = callback.params
    else:
        res = subprocess.run(
            ["bash", "-c", command], cwd=launch, env=ENV, capture_output=True, text=True
        )
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


STEPS = page_steps(PAGE.read_text())


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> tuple[Path, dict]:
    """A directory where the page's commands (but the compile step) ran; the first-batch
    parameters of each training run, by run directory."""
    launch = tmp_path_factory.mktemp("finetune_user")
    first_batch = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for step in STEPS:
            if not is_slow(step):
                run_step(step, launch, monkeypatch, first_batch)
    return launch, first_batch


def last_values(run: Path) -> dict[str, float]:
    """The last non-empty value of every column of a run's ``metrics.csv``."""
    out = {}
    with open(run / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v != ""})
    return out


def test_the_page_is_read():
    commands = [code for kind, code in STEPS if kind == "bash"]
    tools = [shlex.split(c)[1 if c.startswith("OMP") else 0] for c in commands]
    assert tools.count("nequip-mtl-make-data") == 3
    assert tools.count("nequip-package") == 3 and tools.count("nequip-compile") == 1
    names = [c.split("--config-name ")[1].split()[0] for c in commands if "--config-name" in c]
    assert names[:3] == ["pretrain", "finetune_replay", "finetune_replay"]
    assert names[-1] == "finetune_foundation"
    assert sum(kind == "python" for kind, _ in STEPS) == 3


def test_fine_tuning_starts_from_the_pretrained_weights(walked):
    launch, first_batch = walked
    ckpt = torch.load(launch / "outputs/pretrain/best.ckpt", map_location="cpu", weights_only=False)
    pretrained = {
        k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    started = first_batch["outputs/finetune"]
    assert started and set(started) <= set(pretrained)
    for name, value in started.items():
        assert torch.equal(value, pretrained[name]), name
    # and training moved them
    tuned = torch.load(
        launch / "outputs/finetune/last.ckpt", map_location="cpu", weights_only=False
    )
    assert any(not torch.equal(tuned["state_dict"][f"model.{n}"], v) for n, v in started.items())
    # the pretrained model, through the fine-tuning config, on A's test split (run=[val,test],
    # no training) gives the pretraining run's own test errors: same frames, same weights
    pretrain, before = (
        last_values(launch / "outputs/pretrain"),
        last_values(launch / "outputs/before"),
    )
    for metric in METRICS:
        assert math.isclose(
            before[f"test_pretrain_epoch/{metric}"], pretrain[f"test0_epoch/{metric}"], rel_tol=1e-5
        ), metric


def test_both_datasets_metrics_are_logged_under_their_names(walked):
    launch, _ = walked
    values = last_values(launch / "outputs/finetune")
    for split in ("val", "test"):
        for j, dataset in enumerate(("pretrain", "new")):
            for metric in (*METRICS, "weighted_sum"):
                named = values[f"{split}_{dataset}_epoch/{metric}"]
                assert math.isfinite(named)
                assert named == values[f"{split}{j}_epoch/{metric}"]
    # both datasets train (the weighted sum of their components), and the conflict monitor,
    # off by default (`monitor_conflicts`), logged nothing
    for dataset in ("pretrain", "new"):
        assert values[f"train_loss_epoch/{dataset}/forces_mse"] > 0
    assert not any(k.startswith("grad_conflict/") for k in values)


def test_the_fine_tuned_package_predicts_in_ase_without_nequip_mtl(walked, tmp_path):
    launch, _ = walked
    package = launch / "models/finetuned.nequip.zip"
    pretrained = launch / "models/pretrained.nequip.zip"
    xyz = launch / "data/new.xyz"
    ref = _reference(launch / "outputs/finetune/best.ckpt", xyz)
    before = _reference(launch / "outputs/pretrain/best.ckpt", xyz)
    # the deployed package needs neither nequip_mtl nor the pretrained package
    hidden = tmp_path / pretrained.name
    pretrained.rename(hidden)
    try:
        out = _evaluate([package], xyz, tmp_path, hide_mtl=True)
    finally:
        hidden.rename(pretrained)
    assert not out["nequip_mtl_loaded"]
    _assert_same_prediction(out[package], ref)
    assert np.abs(np.array(out[package]["forces"]) - np.array(before["forces"])).max() > 1e-6


def test_the_foundation_config_fine_tunes_on_pseudolabels_within_a_budget(walked, tmp_path):
    """``configs/finetune_foundation.yaml`` offline end to end: the replayed structures are
    labelled by the pretrained package (cached), the budget acts and is logged, fine-tuning
    starts from the pretrained weights, and the deployed package predicts in ASE, without
    nequip_mtl and without the pretrained package, what the fine-tuned checkpoint does."""
    launch, first_batch = walked
    assert (launch / "data/structures.xyz.pseudolabels.pt").is_file()
    values = last_values(launch / "outputs/foundation")
    assert values["budget/replay/limit"] == 1.0
    assert math.isfinite(values["budget/replay/multiplier"])
    assert math.isfinite(values["budget/replay/ratio"])
    assert math.isfinite(values["budget/replay/final_ratio"])  # measured when training ended
    for dataset in ("replay", "new"):
        assert math.isfinite(values[f"val_{dataset}_epoch/forces_mae"])
    ckpt = torch.load(launch / "outputs/pretrain/best.ckpt", map_location="cpu", weights_only=False)
    pretrained = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for name, value in first_batch["outputs/foundation"].items():
        assert torch.equal(value, pretrained[name]), name
    package = launch / "models/foundation_finetuned.nequip.zip"
    pretrained_package = launch / "models/pretrained.nequip.zip"
    xyz = launch / "data/new.xyz"
    ref = _reference(launch / "outputs/foundation/best.ckpt", xyz)
    hidden = tmp_path / pretrained_package.name
    pretrained_package.rename(hidden)
    try:
        out = _evaluate([package], xyz, tmp_path, hide_mtl=True)
    finally:
        hidden.rename(pretrained_package)
    assert not out["nequip_mtl_loaded"]
    _assert_same_prediction(out[package], ref)


def _fine_tune_with(launch: Path, overrides: list[str], callbacks=()) -> str:
    """The page's fine-tuning command with ``overrides`` appended, in this process (the
    training one: the page first runs the same config with ``run=[val,test]``)."""
    _, code = next(s for s in STEPS if FINE_TUNE in s[1] and "run=" not in s[1])
    argv = shlex.split(tiny(code, launch))
    argv = argv[1:] if argv[0].startswith("OMP_NUM_THREADS=") else argv
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(launch)
        return train_in_process([*argv[1:], *overrides], monkeypatch, callbacks)


def test_swapped_dataset_names_bind_by_name_end_to_end(walked):
    """The shipped config with the loss's two datasets swapped: every per-dataset forces
    component of every step is the MSE over the frames of the dataset of its name (computed
    independently). Fails if names bind by position."""
    from tests.test_dataset_binding import ComponentsReadTheirDatasets

    launch, _ = walked
    check = ComponentsReadTheirDatasets()
    _fine_tune_with(
        launch,
        ["training_module.loss.datasets=[new,pretrain]", "hydra.run.dir=outputs/swapped"],
        [check],
    )
    assert check.checked >= 2


def test_a_misspelt_dataset_name_is_refused_end_to_end(walked):
    """A typo in the shipped config's loss datasets stops the run before training. The
    per-dataset coefficients name the datasets too, so the loss refuses it when it is built,
    naming both names; misspelt there too, it reaches setup, where the binding blames the
    misspelt name (not `aggregator.primary`) and names the closest dataset."""
    launch, _ = walked
    typo = "training_module.loss.datasets=[pretrain,neww]"
    with pytest.raises(Exception) as err:
        _fine_tune_with(launch, [typo, "hydra.run.dir=outputs/typo"])
    cause = err.value
    while cause.__cause__ is not None:  # through Hydra's instantiation errors
        cause = cause.__cause__
    message = str(cause)
    assert "PerDatasetLoss: `coeffs` must map" in message
    assert "dataset names ['pretrain', 'neww']" in message and "unknown keys: ['new']" in message
    # the same typo in the coefficients' key too
    coeffs = [
        "~training_module.loss.coeffs.new",
        "+training_module.loss.coeffs.neww={total_energy: 1.0, forces: 1.0, stress: 1.0}",
    ]
    with pytest.raises(ValueError) as err:
        _fine_tune_with(launch, [typo, *coeffs, "hydra.run.dir=outputs/typo"])
    message = str(err.value)
    assert "`training_module.loss.datasets` names the dataset 'neww'" in message
    assert "did you mean 'new'?" in message
    assert not (launch / "outputs/typo/last.ckpt").exists()


@pytest.mark.slow
def test_compile_and_run_the_fine_tuned_model(walked):
    """The page's ``nequip-compile`` command and its ASE/MD block (minutes of compiling)."""
    launch, first_batch = walked
    with pytest.MonkeyPatch.context() as monkeypatch:
        for step in STEPS:
            if is_slow(step):
                run_step(step, launch, monkeypatch, first_batch)
    compiled = launch / "models/finetuned.nequip.pt2"
    xyz = launch / "data/new.xyz"
    out = _evaluate([compiled], xyz, launch, hide_mtl=True)
    _assert_same_prediction(out[compiled], _reference(launch / "outputs/finetune/best.ckpt", xyz))


def test_packaging_takes_single_example_frames_from_balanced_sampling(walked):
    """nequip's ``data_dict_from_checkpoint`` (``nequip-package``, ``nequip-compile``)
    rebuilds the checkpoint's data module with ``batch_size: 1`` for an example frame;
    balanced sampling (5 frames a batch) then gives it one frame. In training, the same
    disagreement is refused."""
    from nequip.data import AtomicDataDict
    from nequip.model.saved_models.checkpoint import data_dict_from_checkpoint
    from nequip.scripts._workflow_utils import get_workflow_state, set_workflow_state

    launch, _ = walked
    ckpt = launch / "outputs/finetune/best.ckpt"
    state = get_workflow_state()
    try:
        for workflow in ("package", "compile"):
            set_workflow_state(workflow)
            data = data_dict_from_checkpoint(str(ckpt))
            assert AtomicDataDict.num_frames(data) == 1
        set_workflow_state("train")
        with pytest.raises(Exception, match="batch_size` is 1, but balanced batches hold"):
            data_dict_from_checkpoint(str(ckpt))
    finally:
        set_workflow_state(state)


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_the_fine_tuning_plots_show_each_dataset_against_the_pretrained_model(walked):
    """The page's `nequip-mtl-plot outputs/finetune` on the real fine-tuning run: the
    summary draws every dataset, named, relative to the validation before training,
    which is the pretrained model's own validation (the `before` run's values); each
    dataset has one color (the config's order: pretrain blue), the units come from the
    run's config as nequip-train saved it; and no logged column is all-NaN or names its
    dataset twice."""
    from nequip_mtl.plot import build_figures, load_run

    launch, _ = walked
    run = launch / "outputs/finetune"
    assert (run / "plots" / "summary.png").is_file()
    logs = load_run(run)
    assert logs.config_path == run / ".hydra" / "config.yaml"  # written by nequip-train (Hydra)
    assert logs.dataset_order == ["pretrain", "new"]
    assert (logs.units.energy, logs.units.length, logs.units.assumed) == ("eV", "Å", False)
    rows = _csv_rows(run)
    first = next(r for r in rows if r.get("val_optimizer_steps"))
    assert first["step"] == "0" and float(first["val_optimizer_steps"]) == 0
    before = last_values(launch / "outputs/before")
    for dataset in ("pretrain", "new"):
        for metric in METRICS:
            key = f"val_{dataset}_epoch/{metric}"
            assert math.isclose(float(first[key]), before[key], rel_tol=1e-6), key
    figures = build_figures(logs)
    axes = {ax.get_title(): ax for ax in figures["summary.png"].axes if ax.axison}
    (title,) = [t for t in axes if "relative to before training" in t]
    colors: dict[str, set] = {}
    for line in axes[title].get_lines():
        dataset, sep, _ = line.get_label().partition(": ")
        if sep:
            colors.setdefault(dataset, set()).add(line.get_color())
    assert colors == {"pretrain": {"#1f77b4"}, "new": {"#d62728"}}
    columns = list(rows[0])
    assert not [c for c in columns if not any(r[c] not in ("", "nan") for r in rows)]
    assert not [c for c in columns for d in ("pretrain", "new") if c.count(d) > 1]


@pytest.mark.parametrize(
    "config, override, component, coeff",
    [
        ("finetune_replay", "training_module.loss.coeffs.new.forces=3.0", "new/forces_mse", 3 / 8),
        (
            "finetune_replay",
            "training_module.loss.coeffs.pretrain.stress=0",
            "new/stress_mse",
            1 / 5,
        ),
        ("multifidelity", "training_module.loss.coeffs.xtb.forces=0.5", "dft/forces_mse", 1 / 3.5),
    ],
)
def test_each_dataset_coefficient_is_a_plain_override(config, override, component, coeff):
    """Hydra composes the shipped config with a plain `key=value` override of one
    dataset's coefficient (no `+`: the key exists), and the loss it builds weights the
    components accordingly (nequip normalises the coefficients to sum to 1).

    Fails with one mapping for every dataset (`coeffs: {total_energy: 1.0, ...}`):
    `coeffs.new` is not a key, and Hydra refuses the override."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name=config, overrides=[override])
    loss = instantiate(OmegaConf.to_container(cfg.training_module.loss, resolve=True))
    assert loss.entries[component].coeff == pytest.approx(coeff, rel=1e-12)


def test_the_fixed_split_block_fine_tunes_on_the_given_files(walked, tmp_path):
    """The page's fixed-split block ("Fixed splits"), in place of the replayed dataset's
    `split_dataset:` in a copy of the config, with A's frames written as three files:
    the fine-tuning command trains, and each of A's splits holds exactly its file's frames
    (B's random split is unchanged)."""
    import ase.io

    from nequip_mtl.tools.emt_alloy import write_frames
    from tests._docs_fragments import Splits, config_with_datasets, fenced_after, substitute

    launch, _ = walked
    frames = ase.io.read(launch / "data/pretrain.xyz", ":")
    files = {}
    for split, part in (("train", frames[:8]), ("val", frames[8:10]), ("test", frames[10:])):
        files[f"/abs/A_{split}.xyz"] = tmp_path / f"A_{split}.xyz"
        write_frames(part, files[f"/abs/A_{split}.xyz"])
    block = fenced_after(PAGE.read_text(), "**Fixed splits.**", "yaml")
    fragment = substitute(block, {k: str(v) for k, v in files.items()})
    configs = config_with_datasets("finetune_replay", fragment, tmp_path / "configs")
    _, code = next(s for s in STEPS if FINE_TUNE in s[1] and "run=" not in s[1])
    argv = shlex.split(tiny(code, launch))
    argv = argv[1:] if argv[0].startswith("OMP_NUM_THREADS=") else argv
    argv[argv.index("--config-path") + 1] = str(configs)
    splits = Splits()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(launch)
        train_in_process([*argv[1:], "hydra.run.dir=outputs/fixed"], monkeypatch, [splits])
    for split, path in (("train", "A_train"), ("val", "A_val"), ("test", "A_test")):
        want = [a.positions for a in ase.io.read(files[f"/abs/{path}.xyz"], ":")]
        got = splits.pos[("pretrain", split)]
        assert len(got) == len(want), split
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert [len(splits.pos[("new", s)]) for s in ("train", "val", "test")] == [6, 2, 2]
    values = last_values(launch / "outputs/fixed")
    assert math.isfinite(values["test_pretrain_epoch/forces_mae"])
