"""Every committed benchmark result regenerates from its raw json: each study's report
(what its ``--from-json`` writes) gives the committed Markdown byte for byte, so the
tables the docs quote are what the raw runs say, and a change of a report's format or of
the registry's labels shows up here. The ``--from-json`` command line itself is run by
tests/test_pareto_benchmark.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import (
    accuracy,
    aggregation_cost,
    conflicts,
    finetune,
    multifidelity,
    pareto,
    protocol,
    readout_heads,
    report,
    step_cost,
)

RESULTS = protocol.RESULTS
DOCS = RESULTS.parents[1] / "docs"
#: a results json's study, by the start of its name
STUDIES = {
    "accuracy": accuracy,
    "aggregation_cost": aggregation_cost,
    "conflicts": conflicts,
    "finetune": finetune,
    "multifidelity": multifidelity,
    "pareto": pareto,
    "readout_heads": readout_heads,
    "step_cost": step_cost,
}


def _study(path: Path):
    (study,) = [m for name, m in STUDIES.items() if path.name.startswith(name)]
    return study


JSONS = sorted(RESULTS.glob("*.json"))


def test_every_committed_json_has_a_study_and_a_table():
    assert len(JSONS) >= 23
    for path in JSONS:
        assert _study(path) is not None
        assert path.with_suffix(".md").exists(), path.name


@pytest.mark.parametrize("path", JSONS, ids=[p.stem for p in JSONS])
def test_committed_table_regenerates_from_its_json(path):
    md = _study(path).markdown(report.read_json(path))
    assert md == path.with_suffix(".md").read_text()


def test_report_writes_the_same_table(tmp_path):
    """A study's report writes what its ``markdown`` gives (md-only report: no figures)."""
    path = RESULTS / "aggregation_cost.json"
    report.from_json([str(path)], str(tmp_path), aggregation_cost.report, out_is_dir=True)
    assert (tmp_path / "aggregation_cost.md").read_text() == path.with_suffix(".md").read_text()


def test_docs_show_the_committed_figures_not_copies():
    """The docs' benchmark figures are read from ``benchmarks/results/`` (Sphinx copies an
    image into the build); no copy of a results figure lies under ``docs/``."""
    shown = [
        (page, path)
        for page in DOCS.glob("*.md")
        for path in re.findall(r"^```\{image\} (\S+)", page.read_text(), flags=re.M)
    ]
    from_results = [path for _, path in shown if path.startswith("../benchmarks/results/")]
    assert len(from_results) >= 11
    for page, path in shown:
        assert (page.parent / path).is_file(), (page.name, path)
    figures = {p.read_bytes() for p in RESULTS.glob("*.png")}
    sources = [p for p in DOCS.rglob("*.png") if "_build" not in p.relative_to(DOCS).parts]
    copies = [p for p in sources if p.read_bytes() in figures]
    assert not copies, f"copies of benchmarks/results figures under docs/: {copies}"
