"""DeepSpeed without just-in-time C++ builds, called inside every Ray Train worker.

On CPU, `deepspeed.initialize` would compile the `deepspeed_shm_comm` op (~70 s) and a config AdamW would
compile `fused_adam` (~95 s). The op is marked incompatible before init, and the optimizer is a client
`torch.optim.AdamW`, so nothing is ever compiled; gloo (CPU) or NCCL (GPU) does the communication.
"""

from __future__ import annotations

import os


def import_deepspeed(use_gpu: bool):
    """`deepspeed`, configured for this worker's accelerator and with the shm op disabled."""
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(batch_size: int, world_size: int, zero_stage: int, bf16: bool) -> dict:
    """Global `batch_size` split evenly across ranks, no accumulation; ZeRO stage from the run config."""
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def gathered_parameter(param):
    """A full, detached fp32 copy of `param`, gathering its shards first under ZeRO-3."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().clone().cpu()


def lr_scheduler(kind: str, total_steps: int):
    """A callable DeepSpeed turns into a scheduler over its own optimizer (None: constant lr, the paper)."""
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"unknown lr_schedule {kind!r}")
    import math

    from torch.optim.lr_scheduler import LambdaLR

    return lambda optimizer: LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))



def load_engine_state(engine, directory: str, tag: str) -> str:
    """Restore `engine` (module, optimizer, scheduler) from `save_checkpoint(directory, tag=tag)`, or fail.

    DeepSpeed does not fail clearly on a checkpoint without its files: no `latest` gives a warning and
    `(None, None)`, no module states a bare `AssertionError`, and missing ZeRO optimizer shards a silent restart
    of the optimizer from the weights. A resume would then go on while the loop state says otherwise."""
    from pathlib import Path

    states = Path(directory) / tag
    missing = [what for what, pattern in (("module states", "*model_states.pt"), ("ZeRO optimizer shards",
                                          "*optim_states.pt" if engine.zero_optimization() else None))
               if pattern and not any(states.glob(pattern))]
    path = None if missing else engine.load_checkpoint(directory, tag=tag)[0]
    if path is None:
        raise RuntimeError(f"DeepSpeed checkpoint {states} has no {' or '.join(missing) or 'loadable state'}: "
                           "refusing to resume from untrained state")
    return path
