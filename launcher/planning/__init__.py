"""Memory and speed before a run: the estimate, the probe, measurement."""
