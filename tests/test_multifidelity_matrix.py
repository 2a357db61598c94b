"""Per-dataset energy references under the several-datasets matrix: the
``PerDatasetEnergyReferences`` wrapper (fixed and trainable references, with and without
per-dataset readout heads and the fidelity-aware type embedding) trained by
``MultitaskLightningModule(tasks: datasets)`` on two EMT Cu "levels of theory" whose energies
differ by -4 per atom (``tests/_mfid.py``), under gradient accumulation, a mid-epoch restart,
train-time compile and two gloo DDP ranks, in float32 and float64.

Each check compares two runs that must train identically by construction (accumulated micro-
batches against one batch of their union, a resumed run against an uninterrupted one, compiled
against eager, two ranks against one process), never against numbers from our own output.
"""

from __future__ import annotations

import pytest
import torch

import nequip_mtl.train as mtl
from nequip_mtl.model import DatasetEnergyShifts, DatasetReadoutHeads, DatasetTypeEmbedding
from tests import _mfid as F
from tests._harness import module_kwargs, params, skip_inductor_under_default_capability, trainer

NAMES = ["lo", "hi"]
#: deliberately off the fitted values (-3.5 and -7.5 per atom), so trainable references move
REFS = {"lo": {"Cu": -2.5}, "hi": {"Cu": -6.25}}
COEFFS = {"lo": {"total_energy": 1.0, "forces": 3.0}, "hi": {"total_energy": 2.0, "forces": 2.0}}
#: the offsets the references start at: reference - the inner model's shared shift (-3)
START = torch.tensor([[REFS[n]["Cu"] + 3.0] for n in NAMES], dtype=torch.float64)
#: bitwise-equal runs are expected; float32 sums in another order differ by rounding only
ATOL = {"float64": 1e-10, "float32": 1e-6}


#: the per-dataset parts on top of the references: ``heads`` readout heads, ``trunk`` readout
#: heads and the per-dataset type-embedding corrections (fidelity-aware trunk layers)
PARTS = {"shifts": {}, "heads": {"readout_heads": True},
         "trunk": {"readout_heads": True, "fidelity_embedding": True}}  # fmt: skip


def model(
    dtype: str = "float64", trainable: bool = True, heads: str = "shifts", names=NAMES, **inner
) -> dict:
    config = F.model_config(dtype)
    config.update(inner)
    return {
        "_target_": "nequip_mtl.model.PerDatasetEnergyReferences",
        "datasets": list(names),
        "references": REFS,
        "trainable": trainable,
        **PARTS[heads],
        "model": config,
    }


def kwargs(dtype="float64", trainable=True, inner=None, heads="shifts", names=NAMES, **kw) -> dict:
    kw.setdefault("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.01})
    kw.setdefault("aggregator", {"_target_": "nequip_mtl.aggregators.UPGrad"})
    return module_kwargs(
        dtype,
        model=model(dtype, trainable, heads, names, **(inner or {})),
        loss={"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": NAMES, "coeffs": COEFFS},
        val_metrics=None,
        tasks="datasets",
        **kw,
    )


def data(per_dataset: int = 1, **kw):
    """Balanced batches of ``per_dataset`` frames of each dataset (lo: 6 training frames of 2
    Cu atoms, hi: 4 of 4 atoms)."""
    sampling = {"mode": "balanced", "frames_per_batch": {n: per_dataset for n in NAMES}}
    return F.data_module(sampling=sampling, train_dataloader={}, **kw)


def fit(root, per_dataset=1, epochs=2, callbacks=(), ckpt_path=None, trainer_kw=None, **kw):
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(**kwargs(**kw))
    tr = trainer(
        root, max_epochs=epochs, callbacks=list(callbacks), limit_val_batches=0,
        **(trainer_kw or {}),
    )  # fmt: skip
    tr.fit(module, datamodule=data(per_dataset), ckpt_path=ckpt_path)
    return module, tr


def shifts(module) -> DatasetEnergyShifts:
    (found,) = [m for m in module.model.modules() if isinstance(m, DatasetEnergyShifts)]
    return found


def test_the_wrapper_is_trained_with_both_datasets_as_tasks(tmp_path):
    """The set-up the matrix varies: trainable references are parameters of the module's model
    and move; fixed ones stay at their values; forces do not reach the references."""
    module, tr = fit(tmp_path / "t", trainable=True)
    offsets = shifts(module).offsets
    assert any(p is offsets for p in module.model.parameters())
    assert tr.global_step == 12 and module.skipped_steps == 0
    assert set(module.applied_task_weights) == set(NAMES)
    assert (offsets.detach() - START).abs().min() > 1e-4  # both datasets' references moved
    fixed, _ = fit(tmp_path / "f", trainable=False)
    assert torch.equal(shifts(fixed).offsets, START)
    assert not any(p is shifts(fixed).offsets for p in fixed.model.parameters())


# ------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "trainable, heads", [(True, "shifts"), (False, "shifts"), (True, "heads"), (True, "trunk")],
    ids=["trainable", "fixed", "trainable_heads", "trainable_trunk"],
)  # fmt: skip
def test_accumulating_two_batches_is_one_batch_of_their_union(tmp_path, dtype, trainable, heads):
    """Balanced batches of 1+1 frames accumulated in pairs against batches of 2+2: the sampler
    reads each dataset's frames in the same order either way, so each big batch is the union
    of two micro-batches; per-dataset losses are means over equal-sized frames, so the window's
    summed task gradients are the big batch's, and UPGrad (nonlinear in them) gives one update."""
    acc, tr_acc = fit(
        tmp_path / "acc", dtype=dtype, trainable=trainable, heads=heads,
        trainer_kw={"accumulate_grad_batches": 2},
    )  # fmt: skip
    big, tr_big = fit(
        tmp_path / "big", per_dataset=2, dtype=dtype, trainable=trainable, heads=heads
    )
    assert tr_acc.global_step == tr_big.global_step == 6
    assert next(acc.model.parameters()).dtype == getattr(torch, dtype)
    torch.testing.assert_close(params(acc), params(big), rtol=0, atol=ATOL[dtype])
    # the check can fail: the same micro-batches without accumulation (twice the steps) differ
    small, _ = fit(tmp_path / "small", dtype=dtype, trainable=trainable, heads=heads)
    assert (params(small) - params(big)).abs().max() > 100 * ATOL[dtype]


# ------------------------------------------------------------------ restart


@pytest.mark.parametrize("heads", list(PARTS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_restart_mid_epoch_resumes_exactly_with_trainable_references(tmp_path, dtype, heads):
    """Interrupted after 3 of 12 steps (mid-epoch) and resumed from the checkpoint: parameters,
    the trainable references (and per-dataset readout heads) included, equal the
    uninterrupted run's (Adam, whose state is restored, and the sampler's position)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt_path=None, **trainer_kw):
        ckpt = ModelCheckpoint(dirpath=str(root), save_last=True, every_n_train_steps=3)
        return fit(
            root, dtype=dtype, callbacks=[ckpt], ckpt_path=ckpt_path, heads=heads,
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
            trainer_kw={"enable_checkpointing": True, **trainer_kw},
        )  # fmt: skip

    full, tr = run(tmp_path / "full")
    assert tr.global_step == 12
    part, tr = run(tmp_path / "part", max_steps=3)
    assert tr.global_step == 3
    resumed, tr = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert tr.global_step == 12
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-12)
    torch.testing.assert_close(shifts(resumed).offsets, shifts(full).offsets, rtol=0, atol=1e-12)
    assert (shifts(part).offsets - shifts(full).offsets).abs().max() > 1e-6
    found = [m for m in full.model.modules() if isinstance(m, DatasetReadoutHeads)]
    assert len(found) == (heads != "shifts")
    if found:  # trained apart by each dataset's own frames
        lo, hi = (p.detach() for p in found[0].heads.parameters())
        assert (lo - hi).abs().max() > 1e-6
    found = [m for m in full.model.modules() if isinstance(m, DatasetTypeEmbedding)]
    assert len(found) == (heads == "trunk")
    if found:  # both datasets' corrections moved, each by its own frames
        assert found[0].corrections.detach().abs().amax(dim=(1, 2)).min() > 1e-6


# ------------------------------------------------------------------ train-time compile


@pytest.mark.slow
@skip_inductor_under_default_capability
def test_train_time_compile_matches_eager_with_trainable_references(tmp_path):
    """`compile_mode: compile` on the wrapped model with readout heads and the per-dataset
    type-embedding corrections, ``dataset_index`` an input of the compiled graph: the
    trajectory, references, heads and corrections included, is eager's.
    Batches of 2+2 frames, so that each dataset's sub-batch has 2 frames (nequip's
    ``CompileGraphModel`` runs eager on 1 frame). The model lists the datasets in the other
    order than the data module, so the compiled graph maps ``dataset_index`` to its rows by
    name (the bound ``dataset_rows``)."""
    runs = {}
    for mode in ("eager", "compile"):
        module, _ = fit(
            tmp_path / mode,
            per_dataset=2,
            epochs=1,
            heads="trunk",
            names=NAMES[::-1],
            inner={"compile_mode": mode},
        )
        runs[mode] = (params(module), shifts(module).offsets.detach().clone())
    assert any(isinstance(m, DatasetReadoutHeads) for m in module.model.modules())
    assert any(isinstance(m, DatasetTypeEmbedding) for m in module.model.modules())
    graph = module.model.sole_model
    assert type(graph).__name__ == "CompileGraphModel"
    assert "dataset_index" in graph.model_input_fields
    (signature,) = graph._compiled_cache[0]  # the compiled path ran (nequip's own cache)
    assert "dataset_index" in signature
    torch.testing.assert_close(runs["compile"][0], runs["eager"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(runs["compile"][1], runs["eager"][1], rtol=0, atol=1e-10)
    assert shifts(module).dataset_rows.tolist() == [1, 0]
    # the references were trained (the model's rows are in its own order: hi, lo)
    assert (runs["eager"][1] - START.flip(0)).abs().min() > 1e-6


# ------------------------------------------------------------------ DDP


@pytest.mark.ddp
def test_two_gloo_ranks_train_like_one_process(tmp_path):
    """Balanced batches of 2+2 frames in one process against 1+1 per rank on 2 gloo ranks
    (``tests/multi_dataset_ddp_worker.py multifidelity``): the ranks hold disjoint halves of the
    one-process batch, and the parameters, the trainable references, the per-dataset
    readout heads and type-embedding corrections included, are the same."""
    import sys

    from tests._ddp import launch

    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        argv = [sys.executable, "-m", "tests.multi_dataset_ddp_worker", str(tmp_path / str(world))]
        launch([*argv, "multifidelity"], world=world)
    one = torch.load(tmp_path / "1" / "rank0.pt")
    ranks = [torch.load(tmp_path / "2" / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and one["world_size"] == 1
    assert len(one["batches"]) == len(ranks[0]["batches"]) == 3
    for t, (idx, e) in enumerate(one["batches"]):
        assert idx == [0, 0, 1, 1]
        (i0, e0), (i1, e1) = ranks[0]["batches"][t], ranks[1]["batches"][t]
        assert i0 == i1 == [0, 1] and sorted(e0 + e1) == sorted(e)
    torch.testing.assert_close(ranks[0]["params"], one["params"], rtol=0, atol=1e-10)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    (offsets,) = one["offsets"]
    torch.testing.assert_close(ranks[0]["offsets"][0], offsets, rtol=0, atol=1e-10)
    assert (offsets - START).abs().min() > 1e-6  # the references were trained
