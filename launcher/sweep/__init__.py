"""Hyperparameter sweeps (``ftl sweep``): the sweep file, the Optuna study in a sweep directory,
trials run here or as a Slurm job array, and the trainer's reports to the study."""
