"""Config fragments of the docs, run as written: the first fenced block after a marker of a
page, a shipped config with the datasets a fragment gives put in place of its own, and a
callback recording what each split of the data module holds."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]


def fenced_after(text: str, marker: str, lang: str) -> str:
    """The first ```lang block after the first occurrence of ``marker`` in ``text``."""
    start = text.index(marker)
    m = re.compile(rf"```{lang}\n(.*?)```", flags=re.S).search(text, start)
    assert m is not None, f"no ```{lang} block after {marker!r}"
    return m.group(1)


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """``text`` with each key replaced by its value; every key must occur."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in the fragment"
        text = text.replace(old, new)
    return text


def config_with_datasets(name: str, fragment: str, out_dir: Path) -> Path:
    """``configs/<name>.yaml`` with each ``data.datasets.<d>`` entry of the YAML ``fragment``
    replacing that dataset's whole entry (what "replace its ``split_dataset:`` block" means),
    written as ``out_dir/<name>.yaml`` (interpolations left as they are); returns
    ``out_dir``."""
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    given = yaml.safe_load(fragment)["data"]["datasets"]
    assert set(given) <= set(config["data"]["datasets"]), sorted(given)
    config["data"]["datasets"].update(given)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    return out_dir


class Splits(Callback):
    """The positions of every frame of each split of the data module, by dataset."""

    def __init__(self):
        self.pos = {}

    def _record(self, trainer, split):
        dm = trainer.datamodule
        for name, ds in zip(dm.dataset_names, getattr(dm, f"{split}_dataset"), strict=True):
            self.pos[(name, split)] = [np.asarray(ds[i]["pos"]) for i in range(len(ds))]

    def on_fit_start(self, trainer, pl_module):
        self._record(trainer, "train")
        self._record(trainer, "val")

    def on_test_start(self, trainer, pl_module):
        self._record(trainer, "test")
