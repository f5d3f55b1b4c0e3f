"""Rows to tokens: the format registry, sources, chat templates and masks, pairs, packing, the preprocess cache, streaming."""
