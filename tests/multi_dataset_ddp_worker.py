"""Worker for the DDP test of ``MultiDatasetDataModule``: one epoch of balanced batches on the
EMT datasets of tests/test_multi_dataset.py, on ``WORLD_SIZE`` gloo ranks (or one process), with
Lightning's ``use_distributed_sampler=True``. Each rank saves the batches it saw, the sampler
class Lightning used and the final parameters. Usage:

    python -m tests.multi_dataset_ddp_worker OUT_DIR [nequip|dataset_tasks|multifidelity|named|budget|budget_unpaired|budget_frames|budget_each|budget_sampled]

(from the root). ``dataset_tasks``: ``MultitaskLightningModule`` with a ``PerDatasetLoss`` and
``tasks: datasets`` (one forward per dataset's sub-batch) instead of nequip's module.
``multifidelity``: the same with the model wrapped by ``PerDatasetEnergyReferences`` (trainable
references, per-dataset readout heads and type-embedding corrections), on the two "levels of theory" of tests/_mfid.py (``lo``, ``hi``).
``named``: nequip's module with ``PerDatasetMetrics`` as validation metrics and the
``DatasetMetricNames`` callback (each loader's metrics computed, synced and logged at its last
batch; a validation before training); each rank also saves its validation metrics.
``budget``: nequip's module with a ``PerDatasetLoss`` and a ``ForgettingBudget`` on ``a``
(three epochs; each batch's ratio paired with the pretrained model's loss on its frames); each
rank also saves the budget's state. ``budget_unpaired``: the batch ratio over the reference
(``paired: false``); ``budget_frames``: the ratio measured on three fixed frames every
second step (``ratio_frames``); ``budget_each``: paired, a bound on each component
(``each_component``); ``budget_sampled``: paired, a slack budget replaying with the
multiplier's odds (``sample_replay``).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from tests._ddp import end_process_group  # noqa: E402
from tests._harness import params, trainer  # noqa: E402
from tests.test_multi_dataset import GLOBAL_FRAMES, BatchRecorder, module, multi  # noqa: E402


def dataset_task_module():
    import nequip_mtl.train as mtl
    from tests._harness import module_kwargs

    torch.manual_seed(0)
    loss = {
        "_target_": "nequip_mtl.train.PerDatasetLoss",
        "datasets": ["a", "b"],
        "coeffs": {
            "a": {"total_energy": 1.0, "forces": 3.0},
            "b": {"total_energy": 2.0, "forces": 2.0},
        },
    }
    return mtl.MultitaskLightningModule(
        **module_kwargs(
            loss=loss,
            val_metrics=None,
            tasks="datasets",
            aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        )
    )


#: global balanced frames per batch of the ``multifidelity`` kind
MFID_GLOBAL_FRAMES = {"lo": 2, "hi": 2}


def multifidelity(world: int):
    import nequip_mtl.train as mtl
    from tests.test_multifidelity_matrix import data, kwargs

    dm = data(per_dataset=MFID_GLOBAL_FRAMES["lo"] // world)
    torch.manual_seed(0)
    return dm, mtl.MultitaskLightningModule(**kwargs(trainable=True, heads="trunk"))


def main(out_dir: str, kind: str = "nequip") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "multifidelity":
        dm, mod = multifidelity(world)
    else:
        per_rank = {name: k // world for name, k in GLOBAL_FRAMES.items()}
        dm = multi(("a", "b"), sampling={"mode": "balanced", "frames_per_batch": per_rank},
                   train_dataloader={})  # fmt: skip
        mod = (
            module(dm)
            if kind in ("nequip", "named", "budget", "budget_frames")
            else dataset_task_module()
        )
    rec = BatchRecorder()
    callbacks = [rec]
    if kind == "named":
        from nequip.train import NequIPLightningModule

        from nequip_mtl.train.callbacks import DatasetMetricNames
        from tests._harness import module_kwargs

        torch.manual_seed(0)
        mod = NequIPLightningModule(
            **module_kwargs(
                num_datasets=dm.num_datasets,
                loss={"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": ["a", "b"]},
                val_metrics={
                    "_target_": "nequip_mtl.train.PerDatasetMetrics",
                    "datasets": ["a", "b"],
                },
            )
        )
        callbacks.append(DatasetMetricNames())
    budget = None
    if kind.startswith("budget"):
        from nequip.train import NequIPLightningModule

        from nequip_mtl.train.callbacks import ForgettingBudget
        from tests._harness import module_kwargs

        torch.manual_seed(0)
        mod = NequIPLightningModule(
            **module_kwargs(
                num_datasets=dm.num_datasets,
                optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
                loss={"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": ["a", "b"]},
                val_metrics=None,
            )
        )
        frames = {
            "budget": {"every": 1, "ratio_frames": None},
            "budget_unpaired": {"every": 1, "ratio_frames": None, "paired": False},
            "budget_frames": {"ratio_frames": 3, "every": 2},
            "budget_each": {"every": 1, "ratio_frames": None, "each_component": True},
            "budget_sampled": {
                "every": 1,
                "ratio_frames": None,
                "sample_replay": True,
                "tolerance": 0.5,
                "step_size": 2.0,
            },
        }[kind]
        frames = {"tolerance": 0.01, "step_size": 20.0, **frames}
        budget = ForgettingBudget(dataset="a", **frames)
        callbacks.append(budget)
    strategy = DDPStrategy(process_group_backend="gloo") if world > 1 else "auto"
    tr = trainer(out_dir, max_epochs=3 if kind.startswith("budget") else 1, devices=world, strategy=strategy, callbacks=callbacks,
                 use_distributed_sampler=True,
                 limit_val_batches=None if kind in ("nequip", "named") else 0)  # fmt: skip
    mod.world_size = tr.world_size  # as nequip-train does
    tr.fit(mod, datamodule=dm)
    state = {
        "batches": rec.batches,
        "sampler": type(tr.train_dataloader.sampler).__name__,
        "params": params(mod),
        "world_size": tr.world_size,
        # the per-dataset references (``multifidelity``), as a tensor to compare
        "offsets": [m.offsets.detach().clone() for m in mod.modules() if hasattr(m, "offsets")],
        "val": {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("val")},
        "budget": None if budget is None else budget.state_dict(),
    }
    torch.save(state, Path(out_dir) / f"rank{tr.global_rank}.pt")
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
