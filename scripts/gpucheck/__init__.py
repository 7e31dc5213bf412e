"""The GPU check behind scripts/gpu_check.py (docs/gpu.md), by concept:

- ``record``: a step's outcome, OUT/gpu_check.json written as each step starts and ends, the table;
- ``checks``: the rules the runs are judged by (pure functions: tests/test_gpu_check.py);
- ``runs``: the check's sizes and state, the ``python -m ssd`` subprocesses, the run config, their outputs;
- ``machine``: the ``environment`` and ``cuda`` steps;
- ``training``: the ``data`` step and the training steps;
- ``weights``: the steps on the fp16 run's weights (``cpu_load``, ``eval_gpu_vs_cpu``);
- ``steps``: ``bench``, ``pytest_cuda``, and every step in order (``STEPS``).

scripts/gpu_check.py, the entry point, puts scripts/ on ``sys.path`` and imports this package.
"""
