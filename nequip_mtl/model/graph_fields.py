"""The input fields of nequip's ``GraphModel``: let ``dataset_index`` through to a wrapped
model, or drop it again (a deployed model at one dataset's level of theory).

Part of packaged models: torch only.
"""

from __future__ import annotations

import torch

__all__ = ["add_input_field", "drop_input_field", "graph_models"]


def graph_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """nequip's ``GraphModel`` modules in ``model``."""
    return [m for m in model.modules() if getattr(m, "is_graph_model", False)]


def add_input_field(model: torch.nn.Module, key: str) -> None:
    """Let nequip's ``GraphModel`` pass ``key`` through to the wrapped model (it keeps only
    the fields in ``model_input_fields``)."""
    for graph_model in graph_models(model):
        graph_model.irreps_in[key] = None
        if key not in graph_model.model_input_fields:
            graph_model.model_input_fields.append(key)
        graph_model.model.irreps_in[key] = None


def drop_input_field(model: torch.nn.Module, key: str) -> None:
    """Undo :func:`add_input_field`: ``key`` is no longer an input of the model."""
    for graph_model in graph_models(model):
        graph_model.irreps_in.pop(key, None)
        if key in graph_model.model_input_fields:
            graph_model.model_input_fields.remove(key)
        graph_model.model.irreps_in.pop(key, None)
