"""The docs say what the code does.

- ``docs/tutorial.md`` describes ``configs/tutorial.yaml``: its training module, LR
  scheduler, clipping, callbacks, model, loss, logger, data file and budget are read
  from the config and looked up on the page (and the page names nothing the config
  does not have).
- ``docs/differences.md``'s repros print what the page says they print.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = (REPO / "docs" / "tutorial.md").read_text()
CONFIG = yaml.safe_load((REPO / "configs" / "tutorial.yaml").read_text())


def _bullet(title: str) -> str:
    """The text of the tutorial's ``- **<title>**: ...`` bullet (up to the next one)."""
    m = re.search(rf"^- \*\*{title}\*\*:(.*?)(?=^- |^\n|\Z)", TUTORIAL, flags=re.S | re.M)
    assert m is not None, f"docs/tutorial.md has no '- **{title}**:' bullet"
    return " ".join(m.group(1).split())


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _lr_scheduler_names() -> set[str]:
    mod = torch.optim.lr_scheduler
    return {
        name
        for name, obj in vars(mod).items()
        if inspect.isclass(obj)
        and not name.startswith("_")
        and (issubclass(obj, mod.LRScheduler) or name == "ReduceLROnPlateau")
        and name not in ("LRScheduler", "_LRScheduler")
    }


def _first_named(text: str, names: set[str]) -> str | None:
    hits = [(m.start(), n) for n in names for m in re.finditer(rf"\b{n}\b", text)]
    return min(hits)[1] if hits else None


def test_training_module_named_on_the_page():
    target = CONFIG["training_module"]["_target_"]
    training = _bullet("Training")
    assert training.startswith(f" `{target}`") or f"`{target}`" in training.split(",")[0]
    assert f"{{py:class}}`{target}`" in TUTORIAL.split("\n## ")[0]  # the introduction


def test_lr_scheduler_and_clipping_match_the_config():
    cfg = CONFIG["training_module"]["lr_scheduler"]
    scheduler = _short(cfg["scheduler"]["_target_"])
    training = _bullet("Training")
    # the first LR scheduler the Training bullet names is the config's
    assert _first_named(training, _lr_scheduler_names()) == scheduler, training
    eta_min = re.search(r"`eta_min` ([-+.\de]+)", training)
    assert eta_min is not None and float(eta_min.group(1)) == cfg["scheduler"]["eta_min"]
    assert f"`T_max: {cfg['scheduler']['T_max']}`" in training
    assert f"stepped every {cfg['interval']}" in training
    clip = CONFIG["trainer"]["gradient_clip_val"]
    assert f"`trainer.gradient_clip_val: {clip}`" in training
    optimizer = CONFIG["training_module"]["optimizer"]
    assert f"{_short(optimizer['_target_'])} (learning rate {optimizer['lr']:g})" in training
    assert f"over the {CONFIG['trainer']['max_epochs']} epochs" in training
    assert f"batch size {CONFIG['batch_size']}" in training


def test_callbacks_match_the_config():
    configured = [_short(c["_target_"]) for c in CONFIG["trainer"]["callbacks"]]
    text = _bullet("Callbacks")
    named = set(re.findall(r"`(?:[\w.]+\.)?([A-Z]\w+)`", text))
    assert named == set(configured), (named, configured)


def test_model_loss_logger_and_data_match_the_config():
    model = CONFIG["training_module"]["model"]
    assert f"`{model['_target_']}`" in _bullet("Model")
    assert f"{CONFIG['num_layers']} layers, {CONFIG['num_features']} features" in _bullet("Model")
    assert f"`l_max = {CONFIG['l_max']}`" in _bullet("Model")
    assert f"a {CONFIG['cutoff_radius']} Å cut-off" in _bullet("Model")
    assert f"`{CONFIG['training_module']['loss']['_target_']}`" in _bullet("Loss")
    (logger,) = CONFIG["trainer"]["logger"]
    assert f"`{logger['_target_']}`" in _bullet("Logger")
    # the data file the page names is the config's default, made absolute
    page_default = re.search(r"default\s+`([^`]+)` under the launch directory", _bullet("Data"))
    assert page_default is not None
    assert CONFIG["data_file"] == "${hydra:runtime.cwd}/" + page_default.group(1)
    splits = "/".join(
        str(round(100 * CONFIG[k])) for k in ("train_split", "val_split", "test_split")
    )
    assert f"split {splits} %" in _bullet("Data")


def test_weighted_sum_is_the_mean_of_the_validation_metrics_as_the_page_says():
    """The page calls the printed `weighted_sum` the mean of the three MAEs: so it is in
    the table the page prints, and so nequip's `MetricsManager` computes it with the
    config's `val_metrics` (1 : 1 : 1) on a batch.

    Fails if the page says "sum" (it is not the sum: nequip divides the coefficients by
    their sum)."""
    from hydra.utils import instantiate
    from nequip.data import AtomicDataDict

    text = " ".join(TUTORIAL.split())
    assert "`weighted_sum` is the coefficient-weighted *mean* of the metrics" in text
    assert "the sum of the per-atom energy, force and stress MAEs" not in text
    table = dict(re.findall(r"test0_epoch/(\w+)\s+([-+.\de]+)", TUTORIAL))
    maes = ("per_atom_energy_mae", "forces_mae", "stress_mae")
    mean = sum(float(table[m]) for m in maes) / 3
    assert float(table["weighted_sum"]) == pytest.approx(mean, rel=1e-12)
    val_metrics = CONFIG["training_module"]["val_metrics"]
    assert set(val_metrics["coeffs"]) == set(maes) and set(val_metrics["coeffs"].values()) == {1.0}
    manager = instantiate(val_metrics)
    torch.manual_seed(0)
    n = 5
    labels = {
        AtomicDataDict.POSITIONS_KEY: torch.randn(n, 3, dtype=torch.float64),
        AtomicDataDict.FORCE_KEY: torch.randn(n, 3, dtype=torch.float64),
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.randn(1, 1, dtype=torch.float64),
        AtomicDataDict.STRESS_KEY: torch.randn(1, 3, 3, dtype=torch.float64),
        AtomicDataDict.NUM_NODES_KEY: torch.tensor([n]),
        AtomicDataDict.BATCH_KEY: torch.zeros(n, dtype=torch.long),
    }
    preds = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in labels.items()}  # fmt: skip
    out = manager(preds, labels)
    assert float(out["weighted_sum"]) == pytest.approx(
        sum(float(out[m]) for m in maes) / 3, rel=1e-12
    )


# ---------------------------------------------------------------- differences page


def _repros(page: Path) -> list[tuple[str, str]]:
    """``(python code, expected output)`` for every python block followed by a text block."""
    pairs = re.findall(r"```python\n(.*?)```\s*\n```text\n(.*?)```", page.read_text(), flags=re.S)
    return [(code, out.strip()) for code, out in pairs]


DIFFERENCES = _repros(REPO / "docs" / "differences.md")


def test_differences_page_has_its_repros():
    assert len(DIFFERENCES) == 3


@pytest.mark.parametrize("code, expected", DIFFERENCES, ids=["gelsy", "softadapt", "coeffs"])
def test_differences_repros_print_what_the_page_says(code, expected, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == expected


# ---------------------------------------------------------------- API pages


def _conf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_conf", REPO / "docs" / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "target, url",
    [
        (
            "torch.nn.modules.module.Module",
            "https://docs.pytorch.org/docs/stable/generated/torch.nn.Module.html",
        ),
        (
            "torch.optim.lr_scheduler.CosineAnnealingLR",
            "https://docs.pytorch.org/docs/stable/generated/"
            "torch.optim.lr_scheduler.CosineAnnealingLR.html",
        ),
        (
            "lightning.pytorch.callbacks.callback.Callback",
            "https://lightning.ai/docs/pytorch/stable/api/lightning.pytorch.callbacks.Callback.html",
        ),
        (
            "nequip.train.lightning.NequIPLightningModule",
            "https://nequip.readthedocs.io/en/latest/api/lightning_module.html"
            "#nequip.train.NequIPLightningModule",
        ),
        ("nequip_mtl.train.ConFIGLightningModule", None),  # ours: resolved inside the docs
        ("torch.no_such_thing", None),
    ],
)
def test_api_links_to_torch_lightning_and_nequip_resolve_offline(target, url):
    assert _conf().external_url(target) == url


def test_class_pages_list_only_their_own_members():
    conf = _conf()
    assert conf.autodoc_inherit_docstrings is False
    assert "inherited-members" not in conf.autodoc_default_options
    template = (REPO / "docs" / "_templates" / "autosummary" / "class.rst").read_text()
    assert ":members:" in template and "inherited" not in template
    assert "_templates" in conf.templates_path
