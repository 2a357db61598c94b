"""Worker for the DDP test of ``MultiDatasetDataModule``: one epoch of balanced batches on the
EMT datasets of tests/test_multi_dataset.py, on ``WORLD_SIZE`` gloo ranks (or one process), with
Lightning's ``use_distributed_sampler=True``. Each rank saves the batches it saw, the sampler
class Lightning used and the final parameters. Usage:

    python tests/multi_dataset_ddp_worker.py OUT_DIR
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from tests._ddp import end_process_group  # noqa: E402
from tests._harness import params, trainer  # noqa: E402
from tests.test_multi_dataset import GLOBAL_FRAMES, BatchRecorder, module, multi  # noqa: E402


def main(out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = {name: k // world for name, k in GLOBAL_FRAMES.items()}
    dm = multi(("a", "b"), sampling={"mode": "balanced", "frames_per_batch": per_rank},
               train_dataloader={})  # fmt: skip
    mod = module(dm)
    rec = BatchRecorder()
    strategy = DDPStrategy(process_group_backend="gloo") if world > 1 else "auto"
    tr = trainer(out_dir, max_epochs=1, devices=world, strategy=strategy, callbacks=[rec],
                 use_distributed_sampler=True)  # fmt: skip
    mod.world_size = tr.world_size  # as nequip-train does
    tr.fit(mod, datamodule=dm)
    state = {
        "batches": rec.batches,
        "sampler": type(tr.train_dataloader.sampler).__name__,
        "params": params(mod),
        "world_size": tr.world_size,
    }
    torch.save(state, Path(out_dir) / f"rank{tr.global_rank}.pt")
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
