"""What a new user copies from the docs works as written.

- every YAML snippet of ``docs/choosing.md``, pasted into ``configs/tutorial.yaml`` as a
  user would, trains one epoch through nequip's real ``nequip-train`` entry point (tiny
  model and data set, given as command-line overrides);
- every ``nequip-train`` command the docs, README and config comments give composes with
  Hydra exactly as ``nequip-train`` composes it (Hydra refuses ``ckpt_path=...``, a key the
  config does not have: ``++ckpt_path=...`` is the working form), and so does every
  ``key=value`` override the prose gives for the command line;
- the docs' ASE calculator calls say that the type names are chemical symbols.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from nequip_mtl.tools import make_dataset
from tests._nequip_train import nequip_train

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "configs" / "tutorial.yaml"
CHOOSING = (REPO / "docs" / "choosing.md").read_text()
SNIPPETS = re.findall(r"```yaml\n(.*?)```", CHOOSING, flags=re.S)
PAGES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]

# a tiny model and one epoch on 12 frames; every other setting is the tutorial's
TINY = [
    "train_split=8",
    "val_split=2",
    "test_split=2",
    "num_layers=1",
    "num_features=4",
    "training_module.model.radial_mlp_width=8",
    "trainer.max_epochs=1",
    "run=[train]",
]


# ---------------------------------------------------------------- 1. choosing.md snippets


def paste(tutorial: dict, snippet: dict) -> dict:
    """The tutorial config with ``snippet`` pasted in, as a user edits it: each key the
    snippet gives under a section (``training_module``, ``trainer``) replaces the
    tutorial's key of that name (``_target_`` included, a whole ``loss:`` block
    included); the snippet's ``trainer.callbacks`` are added to the tutorial's."""
    merged = copy.deepcopy(tutorial)
    for section, block in snippet.items():
        target = merged.setdefault(section, {})
        for key, value in block.items():
            if key == "callbacks":
                target[key] = list(target.get(key, [])) + list(value)
            else:
                target[key] = copy.deepcopy(value)
    return merged


@pytest.fixture(scope="module")
def tiny_xyz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.xyz"
    make_dataset(str(path), num_frames=12, seed=0)
    return path


def test_snippets_are_found():
    assert len(SNIPPETS) >= 5
    targets = [yaml.safe_load(s)["training_module"]["_target_"] for s in SNIPPETS]
    assert "nequip_mtl.train.MultitaskLightningModule" in targets


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_choosing_snippet_pasted_into_the_tutorial_trains_one_epoch(snippet, tiny_xyz, tmp_path):
    pasted = paste(yaml.safe_load(TUTORIAL.read_text()), yaml.safe_load(snippet))
    run_cfg = copy.deepcopy(pasted)
    # `run: [train]` only: leave out the test-time XYZ writer, whose construction alone
    # (nequip's field registration, e3nn's Cartesian-tensor set-up) costs seconds
    callbacks = run_cfg["trainer"]["callbacks"]
    callbacks[:] = [c for c in callbacks if not c["_target_"].endswith("TestTimeXYZFileWriter")]
    (tmp_path / "pasted.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    run_dir = tmp_path / "run"
    nequip_train(tmp_path, "pasted", [f"data_file={tiny_xyz}", f"hydra.run.dir={run_dir}", *TINY])
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # 8 training frames, batch 5
    module_cfg = ckpt["hyper_parameters"]["info_dict"]["training_module"]
    assert module_cfg["_target_"] == pasted["training_module"]["_target_"]


# ---------------------------------------------------------------- 2. documented commands


def _shell_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of the shell code in a page: ```bash blocks of Markdown, comment
    lines of a YAML config."""
    text = path.read_text()
    if path.suffix == ".yaml":
        return [(1, "\n".join(re.sub(r"^#\s?", "", ln) for ln in text.splitlines()))]
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)
    ]


def _nequip_train_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``nequip-train`` command in the docs, README and configs,
    with ``$(pwd)``/``$PWD`` read as the repository root (where the docs run them)."""
    found = []
    for path in [*PAGES, *sorted((REPO / "configs").glob("*.yaml"))]:
        for first, block in _shell_blocks(path):
            rows, start, current = [], first, ""
            for k, row in enumerate(block.splitlines()):
                if not current:
                    start = first + k
                if row.endswith("\\"):
                    current += row[:-1] + " "
                    continue
                rows.append((start, current + row))
                current = ""
            for line, row in rows:
                for part in re.split(r"&&|;|\|", row.split(" #")[0]):
                    if "nequip-train" not in part or part.lstrip().startswith("#"):
                        continue
                    part = part.replace("$(pwd)", str(REPO)).replace("$PWD", str(REPO))
                    argv = shlex.split(part)
                    i = next(j for j, a in enumerate(argv) if a.endswith("nequip-train"))
                    found.append((f"{path.relative_to(REPO)}:{line}", argv[i + 1 :]))
    return found


COMMANDS = _nequip_train_commands()


def _config_and_overrides(argv: list[str]) -> tuple[Path | None, str | None, list[str]]:
    config_dir, name, overrides = None, None, []
    it = iter(argv)
    for arg in it:
        if arg in ("--config-path", "-cp"):
            config_dir = Path(next(it))
        elif arg in ("--config-name", "-cn"):
            name = next(it)
        else:
            overrides.append(arg)
    return config_dir, name, overrides


def _compose_error(config_dir: Path, name: str, overrides: list[str]) -> str | None:
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            compose(config_name=name, overrides=overrides)
    except HydraException as err:
        return f"{err}: {err.__cause__}"
    return None


def test_the_docs_give_nequip_train_commands():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"docs/tutorial.md", "README.md", "configs/tutorial.yaml"} <= where
    overrides = [o for _, argv in COMMANDS for o in argv]
    assert any(o.startswith("++ckpt_path=") for o in overrides)  # the restart


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_nequip_train_command_composes(where, argv):
    """Hydra applies each override as ``nequip-train`` does: an unknown key without ``+``
    or ``++``, or a ``~key`` the config lacks, is refused here as it is there."""
    config_dir, name, overrides = _config_and_overrides(argv)
    if overrides or config_dir is not None:
        assert config_dir is not None and name is not None, f"{where}: {argv}"
        assert (config_dir / f"{name}.yaml").is_file(), f"{where}: no config {config_dir}/{name}"
        error = _compose_error(config_dir, name, overrides)
        assert error is None, f"{where}: `nequip-train {shlex.join(argv)}` fails: {error}"


# `key=value` in inline code (a lower-case key: not an environment variable)
INLINE_OVERRIDE = re.compile(r"`([+~]*([a-z_][\w.]*)=[^`\s]*)`")


def _prose_overrides() -> list[tuple[str, str]]:
    """Inline ``key=value`` overrides of the prose: in a paragraph about the command line,
    or with a key that is a config key (dotted, or a top-level key of the tutorial)."""
    top = set(yaml.safe_load(TUTORIAL.read_text())) | {"hydra"}
    found = []
    for path in PAGES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for para in text.split("\n\n"):
            about = any(w in para for w in ("nequip-train", "command line", "overrid"))
            for override, key in INLINE_OVERRIDE.findall(para):
                if about or "." in key or key in top:
                    found.append((str(path.relative_to(REPO)), override))
    return found


def _page_configs(where: str) -> list[str]:
    """The tutorial and the configs a page runs (``--config-name X``), in that order."""
    named = re.findall(r"--config-name\s+(\w+)", (REPO / where).read_text())
    return list(dict.fromkeys(["tutorial", *named]))


def test_overrides_given_in_prose_compose():
    """An override a page gives in its prose composes with the tutorial or with a config
    that page runs (``monitor_conflicts=true`` is a key of ``finetune_replay`` only)."""
    found = _prose_overrides()
    assert any(o.startswith("++ckpt_path=") for _, o in found)
    bad = []
    for where, override in found:
        errors = [_compose_error(REPO / "configs", c, [override]) for c in _page_configs(where)]
        if all(e is not None for e in errors):
            bad.append(f"{where}: `{override}`: {errors[0]}")
    assert not bad, "\n".join(bad)


def test_the_check_refuses_what_hydra_refuses():
    """The check itself: the forms a user trips on fail, their working forms pass."""
    configs = REPO / "configs"
    assert "ckpt_path" in _compose_error(configs, "tutorial", ["ckpt_path=/a/last.ckpt"])
    assert _compose_error(configs, "tutorial", ["++ckpt_path=/a/last.ckpt"]) is None
    assert "lsqr" in _compose_error(configs, "tutorial", ["~training_module.lsqr"])


# ---------------------------------------------------------------- 6. deployment snippets


def test_docs_calculator_calls_map_chemical_species():
    """Without ``chemical_species_to_atom_type_map=True`` nequip warns "Defaulting to
    using model type names as chemical symbols" (nequip/integrations/utils.py)."""
    calls = []
    for path in PAGES:
        text = path.read_text()
        for m in re.finditer(r"NequIPCalculator\.\w+\((.*?)\)", text, flags=re.S):
            calls.append((path.name, m.group(0)))
    assert len(calls) >= 2
    missing = [c for c in calls if "chemical_species_to_atom_type_map=True" not in c[1]]
    assert not missing, missing
