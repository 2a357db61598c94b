"""Launch a command as ``world`` torchrun-style processes (gloo, loopback) and wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

#: the repository root: workers run from it, so ``python -m tests.<worker>`` and
#: ``python -c "from tests... import ..."`` import this checkout's tests and package
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process_group() -> None:
    """Tear down the gloo process group before the interpreter exits (call at the end
    of every rank's work). Left to interpreter shutdown, gloo's threads are sometimes
    destroyed while still joinable and the rank dies with ``terminate called without
    an active exception`` after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(argv: list[str], world: int, cwd=None, timeout: float = 600) -> None:
    """Run ``argv`` once per rank with MASTER_ADDR/PORT, WORLD_SIZE, NODE_RANK and
    LOCAL_RANK set (Lightning then uses these processes instead of spawning its own);
    ``world == 1`` runs one plain process. Fails with the output of a rank that failed."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world))
        if world > 1:
            env.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK="0", LOCAL_RANK=str(rank)
            )
        procs.append(
            subprocess.Popen(
                argv,
                env=env,
                cwd=REPO if cwd is None else cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
