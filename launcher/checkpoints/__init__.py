"""What a run writes: the run directory, checkpoints, weight files."""
