"""The benchmarks of nequip-mtl, run from the repository root: :mod:`benchmarks.protocol`
(data, models, clocks, runs, step timing), :mod:`benchmarks.methods` (every method, by name),
:mod:`benchmarks.report` (tables, figures, the results' renderer) and the studies, each
``python -m benchmarks.<study>`` writing ``benchmarks/results/<name>.{json,md,png}``:
``accuracy``, ``pareto``, ``finetune``, ``conflicts``, ``multifidelity``, ``readout_heads``,
``step_cost``, ``step_cost_datasets``, ``aggregation_cost``. Their numbers are shown once, in
``docs/benchmarks.md`` (``python -m benchmarks.report --docs``).
"""

import os

# before torch is imported anywhere: one thread per run (the clocks are CPU time of one thread)
os.environ.setdefault("OMP_NUM_THREADS", "1")
