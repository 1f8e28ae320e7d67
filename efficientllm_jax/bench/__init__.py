"""The benchmark suite: sweep definitions (sweeps.py), the runner that trains each variant in its own subprocess
(runner.py), the comparison tables (tables.py) and plots (plots.py), and the slurm job-array script (slurm.py).

Entry points: python -m launch.bench | launch.slurm | launch.xm_launch.
"""
