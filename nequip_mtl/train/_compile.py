"""Train-time compile (``compile_mode: compile``) with several backward passes per graph.

Gradient-aggregation modules back-propagate each loss component separately through
the same compiled graph (``retain_graph=True`` for all but the last pass). PyTorch's
AOTAutograd can compile a backward graph with *donated buffers*: saved activations
that the compiled backward may overwrite in place, valid only if that backward runs
once per forward. ``torch._functorch.config.donated_buffer = False`` turns this off
for graphs compiled in this process -- but Inductor's on-disk FX graph cache (torch
2.13) does not key the compiled backward on its donated buffers. A backward compiled
with donation by a one-backward run (``nequip.train.NequIPLightningModule``, FAMO, a
previous test) of the same model is loaded from the cache by a later several-backward
run, whose second pass then reads overwritten activations: NaN or silently wrong task
gradients. AOTAutograd's own cache then stores that loaded backward under the
several-backward key, so the fault persists across later runs.

:func:`prepare_several_backward_passes` disables donation *and* moves every compile of
this process into its own cache namespace (``torch.compiler.config.cache_key_tag``),
where only donation-free backward graphs are ever stored. See ``docs/compile.md``.
:func:`log_train_time_compile` confirms at fit start that the model is compiled.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from nequip.utils.versions import _TORCH_GE_2_6

logger = logging.getLogger(__name__)

#: the tag appended to ``torch.compiler.config.cache_key_tag`` (``TORCH_COMPILE_CACHE_KEY_TAG``)
CACHE_KEY_TAG = "nequip_mtl-no-donated-buffers"


def prepare_several_backward_passes() -> None:
    """Make compiled graphs of this process safe to back-propagate several times.

    Call before the model is compiled (the training module's ``__init__``; nequip
    compiles lazily at the first forward). Process-wide and idempotent: every later
    compile in this process is donation-free (slightly more backward memory) and uses
    its own entries of the compile caches (no cache sharing with processes that did not
    call this, e.g. plain ``nequip.train.NequIPLightningModule`` runs).
    """
    if not _TORCH_GE_2_6:
        return
    torch._functorch.config.donated_buffer = False
    compiler_config = torch.compiler.config
    if hasattr(compiler_config, "cache_key_tag"):
        tag = compiler_config.cache_key_tag
        if CACHE_KEY_TAG not in tag.split("+"):
            compiler_config.cache_key_tag = f"{tag}+{CACHE_KEY_TAG}" if tag else CACHE_KEY_TAG
    else:  # pragma: no cover - torch versions without a cache key tag: no compile caches
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False


def log_train_time_compile(module: Any) -> bool:
    """Log one INFO line when ``module``'s model is compiled for training; return whether.

    nequip builds a ``CompileGraphModel`` for ``model.compile_mode: compile`` and compiles
    it lazily, at the first forward pass, without saying so; this line confirms the
    setting took effect.
    """
    models = getattr(module, "model", None)
    models = list(models.values()) if isinstance(models, torch.nn.ModuleDict) else [models]
    compiled = [m for m in models if getattr(m, "is_compile_graph_model", False)]
    if compiled:
        logger.info(
            "%s: train-time compile is on (model.compile_mode: compile); the model is "
            "compiled with torch.compile at the first training step",
            type(module).__name__,
        )
    return bool(compiled)
