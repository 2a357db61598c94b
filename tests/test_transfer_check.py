"""The transfer check (``nequip_mtl.diagnostics.transfer``, ``nequip-mtl-transfer-check``).

Expected values are independent computations: the reference residuals from NumPy's
least squares on the frames as ASE reads them; the label differences on shared structures
from the closed form of a known map between two datasets (energy scaled plus a per-type
constant, forces scaled); the gradient cosines (and their spread over the batches) from
``torch.autograd.grad`` of hand-written per-dataset losses on the same batches.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from hydra.utils import instantiate

from nequip_mtl.diagnostics.transfer import (
    balanced_batches,
    dataset_gradients,
    structure_key,
    transfer_check,
)
from nequip_mtl.tools.emt_alloy import generate_frames
from tests import _mfid as F

REPO = Path(__file__).resolve().parents[1]
TYPES = ["Cu", "Ni"]
#: extxyz writes forces with 8 decimals: a relabelled file differs from the exact map by up
#: to 5e-9 eV/Å a component, far below 1e-6 of the differences compared here
RTOL = 1e-6


def _frames(seed: int, n: int = 8) -> list[Atoms]:
    return generate_frames(num_frames=n, seed=seed, elements=TYPES, kind="bulk")


def _relabelled(frames, scale_e: float, per_type: dict, scale_f: float) -> list[Atoms]:
    """The same structures with ``E' = scale_e * E + sum_t per_type[t] n_t`` and
    ``F' = scale_f * F``."""
    out = []
    for atoms in frames:
        new = Atoms(atoms.get_chemical_symbols(), atoms.positions, cell=atoms.cell, pbc=True)
        shift = sum(per_type[s] for s in atoms.get_chemical_symbols())
        energy = scale_e * atoms.get_potential_energy() + shift
        new.calc = SinglePointCalculator(new, energy=energy, forces=scale_f * atoms.get_forces())
        out.append(new)
    return out


def _write(path: Path, frames) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def _dataset(path: Path):
    return instantiate(
        {
            "_target_": "nequip.data.dataset.ASEDataset",
            "file_path": str(path),
            "ase_args": {"format": "extxyz"},
            "transforms": [
                {
                    "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                    "model_type_names": TYPES,
                    "chemical_species_to_atom_type_map": {t: t for t in TYPES},
                }
            ],
        }
    )


def _numpy_residual(path: Path):
    """Per-atom energies after the minimum-norm least-squares per-type references (NumPy),
    and the force components, of the frames in ``path`` as ASE reads them."""
    frames = ase.io.read(path, index=":")
    counts = np.array([[a.get_chemical_symbols().count(t) for t in TYPES] for a in frames], float)
    energies = np.array([a.get_potential_energy() for a in frames])
    refs = np.linalg.lstsq(counts, energies, rcond=None)[0]
    n = counts.sum(axis=1)
    forces = np.concatenate([a.get_forces().reshape(-1) for a in frames])
    return (energies - counts @ refs) / n, forces, np.linalg.matrix_rank(counts)


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


# ------------------------------------------------------------------ labels


def test_reference_residual_and_force_rms_match_numpy(tmp_path):
    paths = {
        "a": _write(tmp_path / "a.xyz", _frames(1)),
        "b": _write(tmp_path / "b.xyz", _frames(2, 6)),
    }
    check = transfer_check({k: _dataset(p) for k, p in paths.items()}, TYPES)
    for summary, (name, path) in zip(check.datasets, paths.items()):
        residual, forces, rank = _numpy_residual(path)
        assert rank == len(TYPES)  # the fit is determined, not only its minimum norm
        assert summary.name == name and summary.frames == len(residual)
        assert summary.energy_residual_rms == pytest.approx(_rms(residual), rel=1e-9)
        assert summary.force_rms == pytest.approx(_rms(forces), rel=1e-12)


def test_shared_structures_recover_the_closed_form_of_a_known_map(tmp_path):
    """``E_b = a E_a + sum_t c_t n_t`` and ``F_b = s F_a`` on the same structures (listed in
    reverse order): each dataset's references absorb ``c`` and scale by ``a``, so the per-atom
    energies after references differ by ``(1 - a) e_a``; forces differ by ``(1 - s) F_a``."""
    a, s, c = 0.7, 1.3, {"Cu": -2.5, "Ni": 4.0}
    frames = _frames(3)
    path_a = _write(tmp_path / "a.xyz", frames)
    path_b = _write(tmp_path / "b.xyz", _relabelled(frames, a, c, s)[::-1])
    check = transfer_check({"hi": _dataset(path_a), "lo": _dataset(path_b)}, TYPES)

    residual, forces, rank = _numpy_residual(path_a)
    assert rank == len(TYPES)
    pair = check.pair("hi", "lo")
    assert (pair.first, pair.second, pair.frames) == ("hi", "lo", len(frames))
    d = (1 - a) * residual
    assert pair.energy_offset == pytest.approx(d.mean(), rel=RTOL)
    assert pair.energy_difference_rms == pytest.approx(_rms(d - d.mean()), rel=RTOL)
    assert pair.force_difference_rms == pytest.approx(abs(1 - s) * _rms(forces), rel=RTOL)
    assert pair.force_rms == pytest.approx(_rms(forces), rel=1e-12)
    assert pair.force_ratio == pytest.approx(abs(1 - s), rel=RTOL)
    # each dataset on its own: the residual scales by a, the forces by s
    hi, lo = check.datasets
    assert lo.energy_residual_rms == pytest.approx(a * hi.energy_residual_rms, rel=RTOL)
    assert lo.force_rms == pytest.approx(s * hi.force_rms, rel=RTOL)
    assert "No shared structures" not in check.table()


def test_only_the_shared_structures_are_compared(tmp_path):
    """The second dataset also holds frames the first lacks, and the first frames the second
    lacks: only the common ones are compared (its references are fitted on all its frames)."""
    s = 0.5
    frames = _frames(4)
    path_a = _write(tmp_path / "a.xyz", frames + _frames(5, 2))
    path_b = _write(
        tmp_path / "b.xyz", _relabelled(frames, 1.0, {"Cu": 1.0, "Ni": 0.0}, s) + _frames(6, 3)
    )
    check = transfer_check({"hi": _dataset(path_a), "lo": _dataset(path_b)}, TYPES)
    pair = check.pair("lo", "hi")
    assert pair.frames == len(frames)
    assert pair.force_ratio == pytest.approx(abs(1 - s), rel=RTOL)
    # energies: each file's own NumPy fit, on the common frames (the first 8 of each)
    e_a, _, _ = _numpy_residual(path_a)
    e_b, _, _ = _numpy_residual(path_b)
    d = e_a[: len(frames)] - e_b[: len(frames)]
    assert pair.energy_difference_rms == pytest.approx(_rms(d - d.mean()), rel=RTOL)


def test_no_shared_structures_is_said(tmp_path):
    frames = _frames(7)
    moved = [f.copy() for f in frames]
    for f in moved:
        f.positions[0, 0] += 0.01  # 100 times the tolerance
        f.calc = SinglePointCalculator(f, energy=0.0, forces=np.zeros((len(f), 3)))
    check = transfer_check(
        {
            "hi": _dataset(_write(tmp_path / "a.xyz", frames)),
            "lo": _dataset(_write(tmp_path / "b.xyz", moved)),
        },
        TYPES,
    )
    pair = check.pair("hi", "lo")
    assert pair.frames == 0 and pair.energy_difference_rms is None and pair.force_ratio is None
    assert "No shared structures" in check.table()


def test_structure_key_names_types_positions_and_cell():
    frame = {
        "atom_types": torch.tensor([0, 1]),
        "pos": torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64),
        "cell": torch.eye(3, dtype=torch.float64) * 4,
    }
    key = structure_key(frame, 1e-4)
    assert structure_key({**frame, "pos": frame["pos"] + 1e-9}, 1e-4) == key
    assert structure_key({**frame, "pos": frame["pos"] + 1e-3}, 1e-4) != key
    assert structure_key({**frame, "atom_types": torch.tensor([1, 0])}, 1e-4) != key
    assert structure_key({**frame, "cell": frame["cell"] * 1.01}, 1e-4) != key


# ------------------------------------------------------------------ gradients

COEFFS = {"lo": {"total_energy": 1.0, "forces": 3.0}, "hi": {"total_energy": 2.0, "forces": 0.5}}


def _independent_rows(model, params, batches):
    """``(batches, datasets, num_params)``: each dataset's loss, written out by hand
    (coefficient-weighted mean of its per-atom energy MSE and force MSE on its frames of the
    batch), differentiated with ``torch.autograd.grad``."""
    out = []
    for batch in batches:
        pred = model(F.clone(batch))
        frame_of_atom = batch["batch"]
        n = torch.bincount(frame_of_atom).to(torch.float64).unsqueeze(-1)
        rows = []
        for d, name in enumerate(F.SPECS):
            frames = batch["dataset_index"].reshape(-1) == d
            atoms = frames[frame_of_atom]
            e = (((pred["total_energy"] - batch["total_energy"]) / n)[frames] ** 2).mean()
            f = ((pred["forces"] - batch["forces"])[atoms] ** 2).mean()
            c = COEFFS[name]
            loss = (c["total_energy"] * e + c["forces"] * f) / (c["total_energy"] + c["forces"])
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, params)
                    ]
                )
            )
        out.append(torch.stack(rows))
    return torch.stack(out)


def _cos(u, v) -> float:
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("heads", [False, True])
def test_gradient_cosines_equal_an_independent_autograd_computation(heads):
    from nequip_mtl.data.binding import bind_dataset_names
    from nequip_mtl.model import PerDatasetEnergyReferences
    from nequip_mtl.train import PerDatasetLoss
    from nequip_mtl.train.task_kinds import component_datasets

    torch.manual_seed(0)
    module = F.data_module()
    module.setup("fit")
    names = list(module.dataset_names)  # lo, hi
    model = PerDatasetEnergyReferences(
        F.model_config("float64"),
        names,
        {"lo": {"Cu": -2.5}, "hi": {"Cu": -6.25}},
        readout_heads=heads,
    )
    loss = PerDatasetLoss(names, coeffs=COEFFS, type_names=["Cu"])
    holder = torch.nn.ModuleDict({"loss": loss, "model": model})
    bind_dataset_names(holder, names)
    params = [p for p in model.parameters() if p.requires_grad]
    head = torch.tensor(
        [".heads." in f".{n}" for n, p in model.named_parameters() if p.requires_grad]
    )
    assert bool(head.any()) == heads
    batches = balanced_batches(list(module.train_dataset), 2, 3, seed=1)

    got = dataset_gradients(
        model, loss, component_datasets(loss), batches, params, frames_per_dataset=2
    )

    rows = _independent_rows(model, params, batches)  # (3 batches, 2 datasets, params)
    sizes = [p.numel() for p in params]
    shared = torch.cat([torch.full((k,), not h) for k, h in zip(sizes, head.tolist())])

    def shared_cos(keep):
        mean = rows[keep].mean(dim=0)
        return _cos(mean[0, shared], mean[1, shared])

    mean = rows.mean(dim=0)
    assert got.names == names and got.batches == 3
    assert got.cosine("lo", "hi", shared=False) == pytest.approx(_cos(mean[0], mean[1]), abs=1e-10)
    assert got.cosine("lo", "hi") == pytest.approx(shared_cos([0, 1, 2]), abs=1e-10)
    assert float(got.statistics.norms[1]) == pytest.approx(float(mean[1].norm()), rel=1e-10)
    if heads:  # a head is not shared: the two cosines differ
        assert abs(got.cosine("lo", "hi") - got.cosine("lo", "hi", shared=False)) > 1e-3
    left_out = np.array([shared_cos([k for k in range(3) if k != b]) for b in range(3)])
    jackknife = math.sqrt(2 / 3 * np.sum((left_out - left_out.mean()) ** 2))
    assert got.cosine_error("lo", "hi") == pytest.approx(jackknife, rel=1e-8)
    assert all(p.grad is None for p in params)  # nothing is trained, no .grad written


# ------------------------------------------------------------------ the command


def test_the_command_runs_on_the_shipped_multifidelity_config(tmp_path, monkeypatch, capsys):
    """``configs/multifidelity.yaml`` on tiny files: 10 DFT frames of ethanol, and as the
    cheap level the same 10 structures relabelled (``E + 5 kcal/mol per H``, ``0.8 F``) plus
    4 GFN2-xTB frames. The frames both training splits hold are found and compared."""
    from nequip_mtl.train import transfer_check as cli

    dft = ase.io.read(REPO / "benchmarks/data/ethanol_reduced_100.xyz", index=":10")
    xtb = ase.io.read(REPO / "benchmarks/data/ethanol_xtb_1200.xyz", index=":4")
    cheap = _relabelled(dft, 1.0, {"C": 0.0, "H": 5.0, "O": 0.0}, 0.8)
    for atoms in cheap:
        atoms.pbc = False
    _write(tmp_path / "dft.xyz", dft)
    _write(tmp_path / "xtb.xyz", cheap + xtb)
    monkeypatch.chdir(REPO)
    overrides = [f"dft_file={tmp_path / 'dft.xyz'}", f"xtb_file={tmp_path / 'xtb.xyz'}",
                 "dft_train=8", "dft_val=1", "dft_test=1", "xtb_train=12", "xtb_val=1",
                 "xtb_test=1", "num_layers=1", "num_features=8"]  # fmt: skip
    argv = ["-cp", "configs", "-cn", "multifidelity", *overrides, "--frames", "2", "--batches", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Transfer check of 2 training datasets: dft (reference), xtb" in out
    assert "Energies in kcal/mol, forces in kcal/mol/Å." in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert lines["dft"][1] == "8" and lines["xtb"][1] == "12"
    pair = lines["dft~xtb"]
    assert int(pair[1]) >= 1  # shared structures found in the two training splits
    assert float(pair[4]) == pytest.approx(0.2, rel=1e-3)  # |1 - 0.8|, to the 4 digits printed
    assert -1.0 <= float(pair[5]) <= 1.0  # the gradient cosine
    assert "No shared structures" not in out and "3 batches of 2 frames" in out


def test_the_command_builds_the_model_eager_under_train_time_compile(monkeypatch):
    """The readings do not depend on train-time compile, which does not support several
    backward passes through one graph (built as configured, the check failed after minutes)."""
    from nequip.nn.compile import CompileGraphModel

    from nequip_mtl.train import transfer_check as cli

    monkeypatch.chdir(REPO)
    overrides = [
        "num_layers=1",
        "num_features=4",
        "+training_module.model.model.compile_mode=compile",
    ]
    config = cli.compose_config("configs", "multifidelity", overrides)
    assert config.training_module.model.model.compile_mode == "compile"
    _, module = cli._build(config)
    assert not any(isinstance(m, CompileGraphModel) for m in module.modules())
    # the check above can fail: nequip builds this class for `compile_mode: compile`
    built = instantiate({**F.model_config("float32"), "compile_mode": "compile"}, _convert_="all")
    assert isinstance(built, CompileGraphModel)


def test_the_command_refuses_a_single_dataset_config_naming_the_key(monkeypatch, capsys):
    from nequip_mtl.train import transfer_check as cli

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        cli.main(["-cp", "configs", "-cn", "tutorial"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "`data._target_` is 'nequip_mtl.data.NequIPDataModule'" in err
    assert "nequip_mtl.data.MultiDatasetDataModule" in err


def _documented_commands() -> list[tuple[str, list[str]]]:
    """``(page, argv)`` of every ``nequip-mtl-transfer-check`` command in the docs and
    README's bash blocks (continuation lines joined)."""
    out = []
    for page in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "nequip-mtl-transfer-check" in words:
                    out.append((page.name, words[words.index("nequip-mtl-transfer-check") + 1 :]))
    return out


def test_every_documented_command_composes(monkeypatch):
    from nequip_mtl.train import transfer_check as cli

    commands = _documented_commands()
    assert {page for page, _ in commands} >= {"multifidelity.md", "diagnostics.md"}
    monkeypatch.chdir(REPO)
    for page, argv in commands:
        args = cli.build_parser().parse_intermixed_args(argv)
        config = cli.compose_config(args.config_path, args.config_name, args.overrides)
        assert "data" in config, (page, argv)


def test_the_readings_import_no_lightning():
    """The maths is pure torch and nequip data: importing it loads no Lightning."""
    code = "import sys, nequip_mtl.diagnostics.transfer; print('lightning' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
