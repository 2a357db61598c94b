"""``docs/data.md`` works as written: every command of its ``bash`` blocks runs (the data
generators in this process, through the functions ``pyproject.toml``'s console scripts name,
with fewer frames; ``nequip-train`` commands are composed by ``tests/test_user_path.py``),
its Python block runs, and every ``_target_`` of its YAML blocks names an object that
exists.

Mutations that fail here: an option the generator does not have (argparse exits with 2), a
``_target_`` or an import of a moved path that no longer resolves, a command of a new
program that no test runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import ase.io
import pytest
import yaml
from hydra.utils import get_object

from tests._scripts import console_script

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "data.md"
TEXT = PAGE.read_text()

#: the generators' commands, run here; ``nequip-train`` ones are composed by test_user_path
GENERATORS = ("nequip-mtl-make-data", "nequip-mtl-make-xtb-data", "nequip-mtl-make-si-pair")
COMPOSED_ELSEWHERE = ("nequip-train",)
#: fewer frames and MD steps than the page's (the same code paths)
FRAMES = 6
XTB_FAST = ["--equilibration", "10", "--stride", "2"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.S)


def _commands() -> list[list[str]]:
    """Each command of the page's bash blocks as argv (continuation lines joined, comments
    and a leading ``VAR=value`` dropped)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.match(r"^[A-Z_]+=", argv[0]):
                argv = argv[1:]
            if argv:
                commands.append(argv)
    return commands


COMMANDS = _commands()
GENERATOR_COMMANDS = [argv for argv in COMMANDS if argv[0] in GENERATORS]


def _smaller(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--frames" in argv:
        argv[argv.index("--frames") + 1] = str(FRAMES)
    if argv[0] == "nequip-mtl-make-xtb-data" and "--relabel" not in argv:
        argv += XTB_FAST
    if argv[0] == "nequip-mtl-make-si-pair":
        argv += ["--quick"]  # 8-atom cells, a frame or two per kind
    return argv


def test_the_page_gives_the_generators_commands():
    programs = {argv[0] for argv in COMMANDS}
    assert programs <= {*GENERATORS, *COMPOSED_ELSEWHERE}, (
        f"docs/data.md has commands of {programs - {*GENERATORS, *COMPOSED_ELSEWHERE}}, "
        "which no test runs"
    )
    assert {argv[0] for argv in GENERATOR_COMMANDS} == set(GENERATORS)
    assert any("--relabel" in argv for argv in GENERATOR_COMMANDS)


@pytest.mark.parametrize(
    "argv", GENERATOR_COMMANDS, ids=[" ".join(a[:2] + a[2:4]) for a in GENERATOR_COMMANDS]
)
def test_generator_command_runs_as_written(argv, tmp_path, monkeypatch):
    """In a fresh directory holding the repository's ``benchmarks/data`` DFT file (which the
    ``--relabel`` command reads; the xTB command writes into that directory there, not into
    the repository's)."""
    if argv[0] in ("nequip-mtl-make-xtb-data", "nequip-mtl-make-si-pair"):
        pytest.importorskip("tblite")
    data = tmp_path / "benchmarks" / "data"
    data.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "benchmarks" / "data" / "ethanol_reduced_100.xyz", data)
    monkeypatch.chdir(tmp_path)
    argv = _smaller(argv)
    assert console_script(argv[0])(argv[1:]) == 0
    if argv[0] == "nequip-mtl-make-si-pair":
        from nequip_mtl.tools.si_pair import FILE_NAMES

        frames = [a for n in FILE_NAMES for a in ase.io.read(tmp_path / argv[1] / f"{n}.xyz", ":")]
    else:
        frames = ase.io.read(tmp_path / argv[1], index=":")
        expected = 100 if "--relabel" in argv else FRAMES
        assert len(frames) == expected
    assert all("energy" in a.calc.results and "forces" in a.calc.results for a in frames)


def test_python_block_runs(tmp_path, monkeypatch):
    (block,) = _blocks("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(PAGE), "exec"), namespace)
    written = ase.io.read(tmp_path / "alloy_small.xyz", index=":")
    assert [a.get_potential_energy() for a in written] == pytest.approx(
        [a.get_potential_energy() for a in namespace["frames"]], rel=1e-12
    )


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_yaml_targets_exist():
    targets = [t for block in _blocks("yaml") for t in _targets(yaml.safe_load(block))]
    assert "nequip_mtl.data.NequIPDataModule" in targets
    for target in targets:
        assert get_object(target) is not None, target
