"""How processes run: strategies, parallel dimensions, the process group, the launch plan, preflight, Slurm."""
