"""Run nequip's real ``nequip-train`` entry point in this process (about 2 s for a tiny
run, against about 20 s for a fresh ``nequip-train`` process on a shared 2-core machine).

It is the function the ``nequip-train`` script calls (``nequip.scripts.train:main``, a
``hydra.main``), given the command line a user would type. Two things differ from a
fresh process, neither part of the config being tested: Hydra's logging set-up is off
(``hydra/job_logging=none``, so that this process's logging is left alone), and the
``training_data_stats`` resolver nequip registers on each run is cleared afterwards (a
second registration in one process is an error); nequip's workflow state is restored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

NO_LOGGING_SETUP = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


def nequip_train(config_dir: Path | str, config_name: str, overrides: list[str]) -> None:
    """``nequip-train --config-path config_dir --config-name config_name *overrides``;
    raises what the run raises (nequip sets ``HYDRA_FULL_ERROR=1``)."""
    from nequip.scripts import _workflow_utils
    from nequip.scripts.train import main

    argv, state = sys.argv, _workflow_utils.get_workflow_state()
    sys.argv = [
        "nequip-train",
        "--config-path",
        str(Path(config_dir).resolve()),
        "--config-name",
        config_name,
        *overrides,
        *NO_LOGGING_SETUP,
    ]
    try:
        main()
    finally:
        sys.argv = argv
        _workflow_utils.set_workflow_state(state)
        if OmegaConf.has_resolver("training_data_stats"):
            OmegaConf.clear_resolver("training_data_stats")
