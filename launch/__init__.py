"""Entry points: `python -m launch` (one run); bench / slurm / xmanager launchers join here."""
