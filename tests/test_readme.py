"""README's commands are the ones CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = next(b for b in _bash_blocks(readme) if "pytest" in b)
    block = re.search(
        r"# --- begin README test command ---\n(.*?)\n# --- end README test command ---",
        ci,
        flags=re.S,
    )
    assert block is not None
    assert block.group(1).strip() == test_cmd


def test_readme_setup_installs_cpu_torch_before_the_package():
    for cmd in _bash_blocks((REPO / "README.md").read_text()):
        if "pip install" in cmd:
            assert cmd.index("torch==2.13.0") < cmd.index('-e ".[test]"')


def test_feature_table_lists_every_public_class():
    import nequip_mtl.aggregators
    import nequip_mtl.train
    import nequip_mtl.train.callbacks

    readme = (REPO / "README.md").read_text()
    for mod in (nequip_mtl.train, nequip_mtl.aggregators, nequip_mtl.train.callbacks):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type):
                assert f"`{mod.__name__}.{name}`" in readme, (
                    f"{mod.__name__}.{name} missing from README"
                )


def test_readme_says_which_torch_build_each_platform_gets():
    """`pip install torch==X` is the CUDA build on Linux from PyPI: README must not call
    it "CPU torch", and must show how to get the CPU build (and a CUDA one) instead."""
    readme = (REPO / "README.md").read_text()
    assert "installs CPU torch" not in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", readme)
    for platform in ("Linux", "macOS", "Windows"):
        assert platform in readme
