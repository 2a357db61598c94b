"""``docs/multifidelity.md``, "Your own data": ``configs/multifidelity.yaml`` on periodic
frames with stress labels, and its fixed-split form, run as the page writes them through
``nequip-train`` (in this process, ``tests/_nequip_train.py``), on small EMT alloy files
(``nequip_mtl.tools.emt_alloy``: periodic Cu-Ni cells with energy, forces and stress) put in
place of the page's ``/abs/...`` files, with a tiny model and a few steps appended.

Checked: with ``stress_coeff=1.0`` both datasets' stress trains and is reported, and no label
goes untrained; with the fixed-split block every split holds exactly its file's frames, and
with the default ``stress_coeff`` the config's label check names each dataset's untrained
stress and the key that trains it.
"""

from __future__ import annotations

import csv
import math
import shlex
import warnings
from pathlib import Path

import ase.io
import numpy as np

from nequip_mtl.tools.emt_alloy import generate_frames, write_frames
from nequip_mtl.train.label_checks import UnusedLabelWarning
from tests._docs_fragments import Splits, config_with_datasets, fenced_after, substitute
from tests.test_finetuning_docs import train_in_process

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "multifidelity.md").read_text()
TYPES = "[Cu,Ni]"
TINY = [
    "num_layers=1",
    "num_features=4",
    "training_module.model.model.radial_mlp_width=8",
    "dft_per_batch=1",
    "xtb_per_batch=1",
    "max_epochs=1",
    "+trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "run=[train,test]",
]


def _write(path: Path, n: int, seed: int) -> Path:
    frames = generate_frames(n, seed=seed, elements=("Cu", "Ni"), kind="bulk")
    write_frames(frames, path)
    return path


def _last_values(run: Path) -> dict[str, float]:
    out = {}
    with open(run / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v != ""})
    return out


def _unused(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UnusedLabelWarning)]


def test_stress_trains_on_periodic_frames_with_stress_coeff(tmp_path, monkeypatch):
    """The page's command for periodic data with stress labels."""
    hi, lo = _write(tmp_path / "hi.xyz", 40, seed=1), _write(tmp_path / "lo.xyz", 300, seed=2)
    code = fenced_after(PAGE, "### Your own data", "bash").replace("\\\n", " ")
    code = substitute(code, {"/abs/hi.xyz": str(hi), "/abs/lo.xyz": str(lo), "[Si]": TYPES})
    code = code.replace("$(pwd)/configs", str(REPO / "configs"))
    argv = shlex.split(code)
    assert argv[:2] == ["OMP_NUM_THREADS=1", "nequip-train"] and "stress_coeff=1.0" in argv
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_in_process([*argv[2:], *TINY, "hydra.run.dir=outputs/stress"], monkeypatch)
    assert _unused(record) == []  # energy, forces and stress all train
    values = _last_values(tmp_path / "outputs/stress")
    for name in ("dft", "xtb"):
        assert values[f"train_loss_epoch/{name}/stress_mse"] > 0
        assert math.isfinite(values[f"test_{name}_epoch/stress_mae"])
    assert values["step"] == 2


def test_the_fixed_split_block_trains_on_the_given_files(tmp_path, monkeypatch):
    """The page's fixed-split block in the config: each split is its file, frame by frame;
    the default stress_coeff (0.0) leaves these frames' stress untrained, and the config's
    label check says so for each dataset, naming the key."""
    files = {
        f"/abs/{name}_{split}.xyz": _write(tmp_path / f"{name}_{split}.xyz", n, seed=seed)
        for name, sizes, base in (("dft", (4, 2, 2), 10), ("xtb", (6, 2, 2), 20))
        for (split, n), seed in zip(zip(("train", "val", "test"), sizes), range(base, base + 3))
    }
    fragment = substitute(
        fenced_after(PAGE, "### Fixed splits", "yaml"), {k: str(v) for k, v in files.items()}
    )
    configs = config_with_datasets("multifidelity", fragment, tmp_path / "configs")
    splits = Splits()
    monkeypatch.chdir(tmp_path)
    argv = ["--config-path", str(configs), "--config-name", "multifidelity",
            f"model_type_names={TYPES}", *TINY, "hydra.run.dir=outputs/fixed"]  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_in_process(argv, monkeypatch, [splits])
    for (name, split), got in splits.pos.items():
        want = [a.positions for a in ase.io.read(files[f"/abs/{name}_{split}.xyz"], ":")]
        assert len(got) == len(want), (name, split)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert len(splits.pos) == 6
    messages = _unused(record)
    assert len(messages) == 2, messages
    for name, n in (("dft", 4), ("xtb", 6)):
        (msg,) = [m for m in messages if m.startswith(f"training dataset '{name}'")]
        assert f"{n} of {n} training frames with a periodic cell hold `stress`" in msg
        assert f"`training_module.loss.coeffs.{name}.stress`" in msg
        assert "(read by" in msg  # the component is there, with stress_coeff 0.0


def test_the_config_header_shows_the_same_fixed_split_form():
    """The config's comment shows the page's block (its `dft` entry, line for line)."""
    text = (REPO / "configs" / "multifidelity.yaml").read_text()
    comments = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
    block = fenced_after(PAGE, "### Fixed splits", "yaml")
    dft = block.split("    dft:\n")[1].split("    xtb:")[0]
    assert len(dft.splitlines()) == 3
    for line in dft.splitlines():
        assert line.strip() in comments, line
