"""DDP: every process holds the whole model; gradients are averaged after each optimizer step's
last micro-batch."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from ftl.distributed.strategies.base import Strategy

if TYPE_CHECKING:
    from accelerate import Accelerator


class DDP(Strategy):
    multi_process = True
    distributed_type = "MULTI_GPU"

    def place(self, weights: float, gradients: float, optimizer: float, layer_bytes: float) -> tuple[float, float, float, float]:
        # DDP's all-reduce buckets: a second copy of the gradients, allocated when the model is wrapped.
        return weights + gradients, gradients, optimizer, 0.0

    def check_wrapped(self, model: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            self._wrong(type(model).__name__)

    @contextmanager
    def gradient_sync(self, accelerator: Accelerator, model: Any, sync: bool) -> Iterator[None]:
        if sync:
            yield
        else:
            with accelerator.no_sync(model):
                yield
