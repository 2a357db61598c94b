"""Every committed benchmark result regenerates from its raw json, and the docs show it once.

- each study's report (what its ``--from-json`` writes) gives the committed Markdown of
  ``benchmarks/results/`` byte for byte, so a change of a report's format or of the
  registry's labels shows up here;
- every results json is rendered into ``docs/benchmarks.md``, between
  ``<!-- generated: <name> -->`` and ``<!-- end generated -->``, and each such section is
  what the renderer makes of the stored json (``python -m benchmarks.report --docs``
  rewrites them; ``--check`` fails on any difference);
- the docs' benchmark figures are the committed ones, not copies.

The ``--from-json`` command line itself is run by tests/test_pareto_benchmark.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import aggregation_cost, report

RESULTS = report.RESULTS
REPO = RESULTS.parents[1]
DOCS = REPO / "docs"
PAGE = report.DOCS.read_text()
JSONS = sorted(RESULTS.glob("*.json"))
SECTIONS = {m[1]: m[2] for m in report.SECTION.finditer(PAGE)}


def test_every_committed_json_has_a_study_a_table_and_a_docs_section():
    assert len(JSONS) >= 20
    for path in JSONS:
        assert report.study_of(path) is not None
        assert path.with_suffix(".md").exists(), path.name
    assert sorted(SECTIONS) == [p.stem for p in JSONS]
    assert len(re.findall("^<!-- generated: ", PAGE, flags=re.M)) == len(SECTIONS)  # none unclosed


@pytest.mark.parametrize("path", JSONS, ids=[p.stem for p in JSONS])
def test_committed_table_regenerates_from_its_json(path):
    md = report.study_of(path).markdown(report.read_json(path))
    assert md == path.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", sorted(SECTIONS), ids=sorted(SECTIONS))
def test_docs_section_is_what_its_json_renders_to(name):
    """The section of the page is the renderer's, from the stored json (no re-run): the
    json's Markdown, its title lines in bold, after a line naming the file."""
    assert SECTIONS[name] == report.docs_section(RESULTS / f"{name}.json")
    assert SECTIONS[name].startswith(f"From `benchmarks/results/{name}.json`")


def test_check_command_passes_and_fails_on_a_stale_table(tmp_path):
    """``python -m benchmarks.report --check`` passes on the committed results; on a copy
    with one table changed by a digit, :func:`report.stale` names exactly that table (the
    mutation a re-run with a forgotten ``--write`` leaves)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in (RESULTS / "readout_heads.json", RESULTS / "aggregation_cost.json"):
        shutil.copy(path, tmp_path)
        shutil.copy(path.with_suffix(".md"), tmp_path)
    assert report.stale(tmp_path) == []
    md = tmp_path / "readout_heads.md"
    md.write_text(md.read_text().replace("1794", "1795"))
    assert report.stale(tmp_path) == ["readout_heads"]
    page = "x\n<!-- generated: aggregation_cost -->\nold\n<!-- end generated -->\ny\n"
    fresh = report.generated_docs(page, tmp_path)
    assert fresh.startswith("x\n<!-- generated: aggregation_cost -->\nFrom `benchmarks/")
    assert fresh.endswith("<!-- end generated -->\ny\n") and "old" not in fresh
    assert report.generated_docs(fresh, tmp_path) == fresh


def test_report_writes_the_same_table(tmp_path):
    """A study's report writes what its ``markdown`` gives (md-only report: no figures)."""
    path = RESULTS / "aggregation_cost.json"
    report.from_json([str(path)], str(tmp_path), aggregation_cost.report, out_is_dir=True)
    assert (tmp_path / "aggregation_cost.md").read_text() == path.with_suffix(".md").read_text()


def test_docs_show_the_committed_figures_not_copies():
    """The docs' benchmark figures are read from ``benchmarks/results/`` (Sphinx copies an
    image into the build); no copy of a results figure lies under ``docs/``, and no two
    committed figures are the same file."""
    shown = [
        (page, path)
        for page in DOCS.glob("*.md")
        for path in re.findall(r"^```\{image\} (\S+)", page.read_text(), flags=re.M)
    ]
    from_results = [path for _, path in shown if path.startswith("../benchmarks/results/")]
    assert len(from_results) >= 11
    for page, path in shown:
        assert (page.parent / path).is_file(), (page.name, path)
    figures = [p.read_bytes() for p in RESULTS.glob("*.png")]
    assert len(set(figures)) == len(figures)
    sources = [p for p in DOCS.rglob("*.png") if "_build" not in p.relative_to(DOCS).parts]
    copies = [p for p in sources if p.read_bytes() in set(figures)]
    assert not copies, f"copies of benchmarks/results figures under docs/: {copies}"


#: pages whose figures are their own example runs or settings, not benchmark results: the
#: tutorials' printed errors (tutorial, fine-tuning, diagnostics), the data generator's
#: mix, the repros' digits (differences)
OWN_FIGURES = {"benchmarks.md", "tutorial.md", "finetuning.md", "diagnostics.md", "data.md",
               "differences.md"}  # fmt: skip
#: a measured figure in prose: mean ± sd, an energy or error in meV, a ratio such as "1.8x",
#: a percentage
FIGURE = re.compile(r"\d\s*±\s*\d|\d\s*meV|\d\.\d+x\b|\d\s*%")


@pytest.mark.parametrize(
    "page",
    [REPO / "README.md", *(p for p in sorted(DOCS.glob("*.md")) if p.name not in OWN_FIGURES)],
    ids=lambda p: p.name,
)
def test_no_measured_figure_outside_the_benchmarks_page(page):
    """The other pages state what the measurements say and link to the table
    (``benchmarks.md#<name>``); a figure copied from a table (mutation: ``"111.5 ± 1.7"``
    or ``"1.10x"`` back in a page) fails here."""
    text = "\n".join(line for line in page.read_text().splitlines() if not line.startswith(":"))
    assert not FIGURE.findall(text), FIGURE.findall(text)  # (``:width: 80%`` lines left out)


def test_every_mean_sd_in_the_pages_prose_is_a_cell_of_its_tables():
    """The prose between the generated sections of docs/benchmarks.md quotes only numbers
    its tables show (a re-run that changes a table leaves no stale copy in the prose)."""
    prose = report.SECTION.sub("", PAGE)
    cells = set(re.findall(r"\d+\.\d ± \d+\.\d", "".join(SECTIONS.values())))
    quoted = set(re.findall(r"\d+\.\d ± \d+\.\d", prose))
    assert quoted <= cells, quoted - cells
