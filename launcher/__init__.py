"""Submit puyu's jobs (Python callables) through submitit: locally, inline, or on Slurm."""
