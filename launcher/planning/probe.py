"""Memory of one real training step, counted tensor by tensor: the oracle of ``ftl.planning.memory``.

A GPU reports its allocator's peak; a CPU does not, and RSS mixes allocator slack with what
training holds. torch's ``MemTracker`` (a dispatch mode that sees every tensor an op creates and
when it dies) gives on any device what ``torch.cuda.max_memory_allocated`` would: parameters,
gradients, optimizer states, activations and temporaries, and the moment of the peak. The step
is ftl's own: the model as ``build_model`` makes it, the recipe's optimizer, the strategy's
autocast, kernels and the objective's loss, on rows ``data.max_length`` tokens long (packed, as the
estimate assumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ftl.distributed import strategies
from ftl.recipe.schema import Recipe
from ftl.objectives.batch import Tokens
from ftl.objectives.sft import SFT
from ftl.models.families import decoder
from ftl.models.build import build_model
from ftl.training.optim import build_optimizer
from ftl.training.trainer import apply_kernels

if TYPE_CHECKING:
    from torch.distributed._tools.mem_tracker import MemTracker


@dataclass
class Measured:
    """Bytes of one optimizer step: its peak, all that was allocated when its forward began
    (weights, optimizer states, held gradients), and what the decoder holds for backward at the
    end of its forward."""

    peak: int
    before_forward: int
    blocks: int


def _tracker() -> "MemTracker":
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenSafeTracker(MemTracker):
        """torch 2.13's tracker hooks every parameter's gradient, which fails on frozen ones
        (LoRA's base); without the hooks a gradient is counted as a temporary: the totals are the same."""

        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return FrozenSafeTracker()


def _batch(recipe: Recipe, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shape = (recipe.train.micro_batch_size, recipe.data.max_length)
    ids = torch.randint(0, vocab, shape, generator=generator)
    return Tokens(ids, ids.clone(), token_mask=torch.ones_like(ids), attention_mask=torch.ones_like(ids))


def measure_step(recipe: Recipe) -> Measured:
    """Train two steps of ``recipe`` on this process's CPU (one device, no sharding) and count the
    second: the first creates the optimizer states, which every later step holds."""
    torch.manual_seed(recipe.train.seed)
    model, tokenizer = build_model(recipe)
    optimizer = build_optimizer(model, recipe.train)
    strategy = strategies.build("single", recipe)
    device = torch.device("cpu")
    objective = SFT(recipe, tokenizer.pad_token_id, apply_kernels(recipe, model, strategy, device))
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    model.train()

    def step() -> None:
        for _ in range(recipe.train.gradient_accumulation_steps):
            with strategy.autocast(device):
                loss = objective.loss_sum(model, _batch(recipe, vocab, generator))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = _tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[device]
    stack = tracker.memory_tracking[decoder(model)]
    before, after = stack.snapshots["Pre-Forward"][0][device], stack.snapshots["Post-Forward"][0][device]
    root = tracker.memory_tracking[model].snapshots["Pre-Forward"][0][device]
    return Measured(
        peak=peak["Total"],
        before_forward=root["Total"],
        blocks=after["Activation"] - before["Activation"],
    )
