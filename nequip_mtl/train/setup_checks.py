"""Moved: the setup checks live in modules of one job each (this path still works, with a
DeprecationWarning): :mod:`~nequip_mtl.train.arguments` (the module's keys and values),
:mod:`~nequip_mtl.train.coefficients` (loss coefficients),
:mod:`~nequip_mtl.train.aggregator_spec` (building the aggregator),
:mod:`~nequip_mtl.train.trainer_checks` (strategy, precision, clipping),
:mod:`~nequip_mtl.train._compile` (the train-time compile line); the task grouping is
:mod:`~nequip_mtl.train.task_kinds`."""

from .._moved import forward_names

_NEW_HOMES = {
    "arguments": (
        "module_arguments",
        "check_module_arguments",
        "check_multitask_arguments",
        "check_weights_every",
    ),
    "coefficients": ("check_loss_coeffs",),
    "aggregator_spec": ("build_aggregator",),
    "trainer_checks": (
        "CLIP_ALGORITHMS",
        "check_strategy",
        "check_precision",
        "check_clipping",
        "check_clipping_once",
        "active_scaler",
    ),
    "_compile": ("log_train_time_compile",),
    "task_kinds": ("component_datasets",),
}

__getattr__ = forward_names(
    __name__,
    {
        name: f"nequip_mtl.train.{module}:{name}"
        for module, names in _NEW_HOMES.items()
        for name in names
    },
)
