"""Worker for the multi-process DDP tests: trains each requested module, saves parameters.

Launched by tests/test_ddp.py once per rank with torchrun-style environment variables
(MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK), or as a single process
with --world-size 1 for the reference run. Usage:

    python -m tests.ddp_worker SPEC_JSON OUT_DIR     (from the repository root)
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hydra.utils import get_class, instantiate  # noqa: E402

from tests._ddp import end_process_group  # noqa: E402
from tests._harness import datamodule, module_kwargs, trainer  # noqa: E402


class CollectiveLog:
    """Records the shape of every tensor passed to ``torch.distributed.all_reduce``."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self._all_reduce = torch.distributed.all_reduce

        def recording_all_reduce(tensor, *args, **kwargs):
            self.shapes.append(tuple(tensor.shape))
            return self._all_reduce(tensor, *args, **kwargs)

        torch.distributed.all_reduce = recording_all_reduce


def main(spec_path: str, out_dir: str) -> None:
    collectives = CollectiveLog()
    spec = json.loads(Path(spec_path).read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = spec["frames"]
    for run in spec["runs"]:
        torch.manual_seed(0)
        cls = get_class(run["module"])
        module = cls(**module_kwargs(**run.get("module_kwargs", {})))
        strategy = "auto"
        if world > 1:
            strategy = instantiate({**spec["strategy"], "process_group_backend": "gloo"})
        callbacks = [instantiate(c) for c in run.get("callbacks", [])]
        tr = trainer(
            out_dir,
            max_epochs=spec["epochs"],
            devices=world,
            strategy=strategy,
            callbacks=callbacks,
            use_distributed_sampler=True,
            accumulate_grad_batches=run.get("accumulate", 1),
        )
        module.world_size = tr.world_size  # as nequip-train does
        # the whole training split is one global batch: per-rank batch n / world
        # (with accumulation: k micro-batches of n / world / k frames per rank)
        dm = datamodule(
            num_frames=n + 2, train=n, val=2, batch_size=n // world // run.get("accumulate", 1)
        )
        collectives.shapes.clear()
        tr.fit(module, datamodule=dm)
        n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        # all-reduces of task-gradient rows: 2-D, one column per trainable parameter
        task_matrix_reduces = [s for s in collectives.shapes if len(s) == 2 and s[1] == n_params]
        if tr.global_rank == 0 or world == 1:
            state = {
                "params": torch.cat([p.detach().flatten() for p in module.model.parameters()]),
                "coeffs": {k: e.coeff for k, e in module.loss.entries.items()},
                "world_size": tr.world_size,
                "task_matrix_reduces": task_matrix_reduces,
                "steps": tr.global_step,
            }
            torch.save(state, Path(out_dir) / f"{run['name']}.pt")
        if world > 1:
            coeffs = torch.tensor(
                [e.coeff or 0.0 for e in module.loss.entries.values()], dtype=torch.float64
            )
            gathered = [torch.zeros_like(coeffs) for _ in range(world)]
            torch.distributed.all_gather(gathered, coeffs)
            if tr.global_rank == 0:
                torch.save(
                    torch.stack(gathered), Path(out_dir) / f"{run['name']}.coeffs_all_ranks.pt"
                )
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
