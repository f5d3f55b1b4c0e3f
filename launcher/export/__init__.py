"""Merged exports: merge, sharded safetensors, verification, the chat template, GGUF."""
