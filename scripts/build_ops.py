"""Build DeepSpeed's JIT ops once, at install time (1-2 minutes each on 2 cores).

DeepSpeed installs as pure Python and compiles an op the first time a run needs it, into
``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``). Paying that inside the first training
run made multi-process tests time out on fresh machines; building here makes every run load them
from the cache. Which ops: the shared-memory collectives every ``deepspeed.initialize`` loads on
CPU, the fused Adam a DeepSpeed config with an optimizer loads, and the CPU Adam of optimizer
offload.
"""

from __future__ import annotations

import sys
import time

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"build_ops: {name} does not apply to {accelerator.device_name()}; skipped")
            continue
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"build_ops: {builder.name} ready ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
