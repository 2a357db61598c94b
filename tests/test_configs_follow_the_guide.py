"""Every shipped config defaults to what ``docs/choosing.md`` recommends for its job.

``docs/recommendations.yaml`` is the guide's advice in machine-readable form: for each job, the
config keys that carry the recommended method. Each config in ``configs/`` names its job in a
header line ``# guide job: <job>``; composed as ``nequip-train`` composes it, it must hold
those keys, unless its header says in one line why not (``# not the guide's default: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_configs_clone import CONFIGS, compose_as_nequip_train

REPO = Path(__file__).resolve().parents[1]
GUIDE = yaml.safe_load((REPO / "docs" / "recommendations.yaml").read_text())
JOB = re.compile(r"^# guide job: (.+)$", re.M)
EXCEPTION = re.compile(r"^# not the guide's default: (.+)$", re.M)


def header(name: str) -> str:
    """The config's leading comment block."""
    lines = (REPO / "configs" / f"{name}.yaml").read_text().splitlines()
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line)
    return "\n".join(out)


def test_every_job_of_the_table_is_a_section_of_the_guide():
    headings = set(re.findall(r"^## (.+)$", (REPO / "docs/choosing.md").read_text(), re.M))
    for job, entry in GUIDE.items():
        assert entry["section"] in headings, job
        assert entry["keys"], job


@pytest.mark.parametrize("name", CONFIGS)
def test_the_config_defaults_to_the_guides_method_for_its_job(name, tmp_path):
    """Fails if a shipped config's method differs from the guide's for its job (e.g. the
    fine-tuning config defaulting to PrimaryConstrained, which the guide does not
    recommend), or if a config names no job or one the guide lacks."""
    text = header(name)
    jobs = JOB.findall(text)
    assert len(jobs) == 1, f"configs/{name}.yaml: name its job in one `# guide job:` line"
    job = jobs[0].strip()
    assert job in GUIDE, f"configs/{name}.yaml: job {job!r} is not in docs/recommendations.yaml"
    exception = EXCEPTION.findall(text)
    values, _, _ = compose_as_nequip_train(name, tmp_path)
    differs = {
        key: (values.get(key, "<absent>"), want)
        for key, want in GUIDE[job]["keys"].items()
        if values.get(key, "<absent>") != want
    }
    if exception:
        # the header's reason must be about a real difference
        assert differs, f"configs/{name}.yaml says why it differs from the guide, but it does not"
    else:
        assert not differs, f"configs/{name}.yaml differs from docs/recommendations.yaml: {differs}"
