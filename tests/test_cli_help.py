"""The command-line help says what a new user needs next to it: ``nequip-mtl-make-data``
that the config's ``model_type_names`` must match ``--elements`` (and which line of the
tutorial config that is), ``nequip-mtl-plot`` which extra reads TensorBoard logs."""

from __future__ import annotations

import re
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml

from nequip_mtl.plot import cli as plot_cli
from nequip_mtl.tools import make_data as data_cli

REPO = Path(__file__).resolve().parents[1]


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse re-wraps: compare unwrapped


def test_make_data_help_names_model_type_names(capsys):
    text = _help(data_cli.main, capsys)
    assert "`model_type_names` must list the same elements as --elements" in text
    # the line it quotes is the tutorial config's, and matches the default elements
    config = yaml.safe_load((REPO / "configs" / "tutorial.yaml").read_text())
    names = config["model_type_names"]
    assert f"configs/tutorial.yaml has model_type_names: [{', '.join(names)}]" in text
    assert f"(default: {','.join(names)})" in text


def test_make_data_prints_the_config_line(tmp_path, capsys):
    assert data_cli.main([str(tmp_path / "d.xyz"), "--frames", "2", "--elements", "Au,Cu"]) == 0
    assert "the training config needs model_type_names: [Au, Cu]" in capsys.readouterr().out


def test_plot_help_names_the_tensorboard_extra(capsys):
    text = _help(plot_cli.main, capsys)
    match = re.search(r'pip install -e "\.\[(\w+)\]"', text)
    assert match and "TensorBoard logs" in text, text
    # the extra it names exists in the installed package's metadata and brings tensorboard
    extra = f'extra == "{match[1]}"'
    assert any(r.startswith("tensorboard") and extra in r for r in requires("nequip-mtl")), (
        requires("nequip-mtl")
    )


def test_transfer_check_help_points_to_its_docs_section(capsys):
    from nequip_mtl.train import transfer_check

    text = _help(transfer_check.main, capsys)
    assert "docs/multifidelity.md, 'Before training: the transfer check'" in text
    page = (REPO / "docs" / "multifidelity.md").read_text()
    assert "\n## Before training: the transfer check\n" in page
    assert "nequip_mtl.data.MultiDatasetDataModule" in text
