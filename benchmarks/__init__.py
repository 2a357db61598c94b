"""The benchmarks of nequip-mtl, a package run from the repository root.

- :mod:`benchmarks.protocol`: data, model, trainer, clocks, the training run, validation;
- :mod:`benchmarks.methods`: every method a study can run, by name;
- :mod:`benchmarks.report`: statistics, Markdown/JSON tables, figures, ``--from-json``;
- the studies, each ``run -> <out>.json`` and ``report(<out>.json) -> md/png``:
  ``accuracy``, ``pareto``, ``finetune``, ``conflicts``, ``multifidelity``, ``step_cost``,
  ``aggregation_cost``, ``readout_heads``.

Run a study as a module, e.g.::

    OMP_NUM_THREADS=1 python -m benchmarks.pareto --quick
    python -m benchmarks.pareto --from-json benchmarks/results/pareto_ethanol.json --out /tmp/p

Results are in ``benchmarks/results/``.
"""

import os

# before torch is imported anywhere: one thread per run (the clocks are CPU time of one thread)
os.environ.setdefault("OMP_NUM_THREADS", "1")
