"""Every config in ``configs/`` runs from a fresh clone: composed as

    nequip-train --config-path <repo>/configs --config-name <name>

composes it, launched from a directory that holds nothing else (no data beside it, no
``../shared``), every file the config reads is a file of the repository (tracked by git) or
one that a command given in the config's own comments writes (``nequip-mtl-make-data``,
``nequip-package build``), run from that directory. A default data path outside the clone
(a development machine's folder) or a file that is only on this machine fails here.

The composition is Hydra's own ``hydra.main`` with nequip's command line (``--config-path``,
``--config-name``), inside the job, so that ``${hydra:runtime.cwd}`` is the launch directory
as it is for ``nequip-train``; each value is resolved on its own, and only the values nequip
computes during the run (``${training_data_stats:...}``) and those read from a file the
comments' commands write (``${type_names_from_package:...}`` of the pretrained package) may
be left unresolved.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import nequip  # noqa: F401  (registers nequip's resolvers, as nequip-train has them)
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
#: the resolver nequip registers during the run (statistics of the training data)
RUN_TIME_RESOLVER = "training_data_stats"
#: the commands of a config's comments that write a file, and the group holding its path
WRITERS = [
    re.compile(r"nequip-mtl-make-data\s+(\S+)"),
    re.compile(r"nequip-mtl-make-xtb-data\s+(\S+)"),
    re.compile(r"nequip-package\s+build\s+\S+\s+(\S+)"),
    # a file the run itself writes and later runs reuse (e.g. a cache of pseudolabels)
    re.compile(r"the run writes\s+(\S+)"),
]


def _tracked_files() -> set[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files of a clone are not known")
    return set(filter(None, out.split("\0")))


def _comments(name: str) -> str:
    path = REPO / "configs" / f"{name}.yaml"
    return "\n".join(ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("#"))


def documented_outputs(name: str) -> set[str]:
    """The files (relative to the launch directory) that the commands in the comments of
    ``name`` write, and those of the configs they say to run first (``configs/X.yaml``)."""
    text = _comments(name)
    for other in re.findall(r"configs/(\w+)\.yaml", text):
        if other != name and other in CONFIGS:
            text += "\n" + _comments(other)
    return {m for pattern in WRITERS for m in pattern.findall(text)}


def compose_as_nequip_train(name: str, launch: Path, overrides=()) -> tuple[dict, dict, str]:
    """``(values, unresolved, output_dir)``: every value of config ``name`` by its dotted key,
    resolved inside a Hydra job started with nequip-train's command line from ``launch``;
    ``unresolved``: key -> (raw value, error) of the values that did not resolve."""
    found: dict = {}

    @hydra.main(version_base=None, config_path=str(launch), config_name="config")
    def job(cfg: DictConfig) -> None:
        found["output_dir"] = HydraConfig.get().runtime.output_dir
        values, unresolved = {}, {}

        def walk(node, prefix: str) -> None:
            raw = OmegaConf.to_container(node, resolve=False)
            keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
            for k in keys:
                key = f"{prefix}[{k}]" if isinstance(node, ListConfig) else f"{prefix}.{k}"
                try:
                    value = node[k]
                except Exception as err:  # noqa: BLE001 - every failure is reported below
                    unresolved[key.lstrip(".")] = (raw[k], err)
                    continue
                if isinstance(value, (DictConfig, ListConfig)):
                    walk(value, key)
                else:
                    values[key.lstrip(".")] = value

        walk(cfg, "")
        found["values"], found["unresolved"] = values, unresolved

    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [
        "nequip-train",
        "--config-path",
        str(REPO / "configs"),
        "--config-name",
        name,
        f"hydra.run.dir={launch / 'outputs' / name}",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        *overrides,
    ]
    os.chdir(launch)
    try:
        job()
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return found["values"], found["unresolved"], found["output_dir"]


def input_files(values: dict, output_dir: str) -> dict[str, str]:
    """The absolute paths a config names (key -> path), outputs of the run left out."""
    out = Path(output_dir)
    return {
        key: value
        for key, value in values.items()
        if isinstance(value, str)
        and os.path.isabs(value)
        and not Path(value).is_relative_to(out)
        and not key.startswith("hydra.")
    }


@pytest.fixture
def launch(tmp_path) -> Path:
    """An empty launch directory with nothing beside it, as a fresh clone's root has."""
    root = tmp_path / "clone"
    root.mkdir()
    assert not (root.parent / "shared").exists()
    return root


def test_every_config_is_checked():
    assert {"tutorial", "ethanol", "multifidelity", "pretrain", "finetune_replay"} <= set(CONFIGS)


def test_the_documented_outputs_are_found():
    assert "data/alloy.xyz" in documented_outputs("tutorial")
    # fine-tuning starts from what configs/pretrain.yaml's commands write
    assert {"data/new.xyz", "data/pretrain.xyz", "models/pretrained.nequip.zip"} <= (
        documented_outputs("finetune_replay")
    )
    assert documented_outputs("ethanol") == set()


def problems(name: str, files: dict[str, str], launch: Path) -> list[str]:
    """What a fresh clone launched from ``launch`` lacks among the files a config reads."""
    tracked, written = _tracked_files(), documented_outputs(name)
    out = []
    for key, path in files.items():
        normal = Path(os.path.normpath(path))
        if not normal.is_relative_to(launch):
            out.append(f"`{key}` is {path}, outside the launch directory: a clone lacks it")
            continue
        rel = normal.relative_to(launch).as_posix()
        if rel in tracked:
            if not (REPO / rel).is_file():
                out.append(f"`{key}`: `{rel}` is tracked, but not in {REPO}")
        elif rel not in written:
            out.append(
                f"`{key}` is `{rel}` under the launch directory: neither a file of the "
                f"repository nor written by a command of the config's comments {sorted(written)}"
            )
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_config_reads_only_files_of_a_clone_or_of_its_documented_commands(name, launch):
    values, unresolved, output_dir = compose_as_nequip_train(name, launch)
    # only the values nequip computes during the run, or reads from a file the documented
    # commands write first, stay unresolved
    written = [str(launch / rel) for rel in documented_outputs(name)]
    bad = {
        key: f"{raw!r}: {err}"
        for key, (raw, err) in unresolved.items()
        if RUN_TIME_RESOLVER not in f"{raw} {err}" and not any(w in str(err) for w in written)
    }
    assert not bad, f"configs/{name}.yaml: values that do not resolve: {bad}"
    files = input_files(values, output_dir)
    assert any(k.endswith("file_path") for k in files), f"configs/{name}.yaml names no data file"
    found = problems(name, files, launch)
    assert not found, f"configs/{name}.yaml, launched from a fresh clone:\n" + "\n".join(found)


def test_the_check_refuses_what_a_clone_lacks(launch):
    """The check itself: a default path beside the clone, or an untracked file, is refused."""
    for path, expected in [
        ("${hydra:runtime.cwd}/../shared/ethanol.xyz", "outside the launch directory"),
        ("${hydra:runtime.cwd}/data/ethanol.xyz", "neither a file of the repository"),
    ]:
        values, _, output_dir = compose_as_nequip_train("ethanol", launch, [f"data_file={path}"])
        found = problems("ethanol", input_files(values, output_dir), launch)
        # the data module's key, and the top-level key the config sets it from
        assert [f.split(" ")[0] for f in found] == [
            "`data_file`",
            "`data.split_dataset.dataset.file_path`",
        ]
        assert all(expected in f for f in found)
    values, _, output_dir = compose_as_nequip_train("ethanol", launch)
    assert problems("ethanol", input_files(values, output_dir), launch) == []
