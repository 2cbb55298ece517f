"""Run `erasure` under Accelerate's FSDP on CPU processes: `accelerate launch --use_fsdp ... fsdp_cpu.py ARGS`.

Accelerate switches FSDP on only for accelerator devices: on CPU, `AcceleratorState` has no branch for it and
stays MULTI_CPU, ignoring the FSDP flags `accelerate launch` exported. This script adds that one missing step:
after the Accelerator is built, it sets the distributed type to FSDP and the plugin to the one those flags
describe (read from the environment, as Accelerate does on GPUs). Everything after it, `prepare`'s FSDP2
sharding (`fully_shard` over gloo), the optimizer's remapping, `get_state_dict` and checkpoints, is
Accelerate's own code, so the tests exercise the path a GPU run takes. With CRASH_AT_STEP=N in the
environment, `Eraser.step_loss` raises at step N (an interruption, for the resume test).
"""
from __future__ import annotations

import os
import sys

from interrupt import crashing_at  # this folder: the script's own directory is first on sys.path

import erasure.accel
import pipelines.stable_diffusion


def fsdp_accelerator(**kwargs):
    """`make_accelerator` with Accelerate's FSDP state from the launch flags (`--fsdp_version` included)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = erasure.accel.make_accelerator(**kwargs)
    PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it back on every call
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


if __name__ == "__main__":
    from erasure.cli import main

    pipelines.stable_diffusion.make_accelerator = fsdp_accelerator
    if "CRASH_AT_STEP" in os.environ:
        eraser = pipelines.stable_diffusion.Eraser
        eraser.step_loss = crashing_at(eraser.step_loss, int(os.environ["CRASH_AT_STEP"]))
    sys.exit(main(sys.argv[1:]))
