"""The parts of the training loop (``ftl.train``): the Trainer, its state, resume, stop signals, optimizer, metrics."""
