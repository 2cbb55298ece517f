"""Throughput of the class-conditional DDPM: guided sampling and training steps. Prints one JSON line.

Sampling runs `pipelines.ddpm.sample` (classifier-free guidance: conditional and null batch in one
forward pass, per-image generators) with DDIM at 32x32 (or --resolution); training runs the diffusion loss, backward
and an Adam step of the preset's UNet (random weights). Each is measured at the asked batch and
precision and at a baseline in the same run (default: fp32 at the same batch on CUDA, batch 1 on CPU),
and the ratio is reported.

    python scripts/bench_ddpm.py --preset fast --batch 1000 --train-batch 128 --dtype bf16   # one H100
    python scripts/bench_ddpm.py --preset fast --batch 8 --train-batch 16 --steps 10         # a CPU
    python scripts/bench_ddpm.py --preset cpu --resolution 16 --batch 250 --train-batch 64 --steps 20  # CPU story
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from erasure.accel import DTYPE_NAMES, resolve_device, torch_dtype
from pipelines.ddpm import PRESETS, build_scheduler, build_unet, parameter_count, predictor, sample
from pipelines.ddpm_config import CIFAR10_RESOLUTIONS
from pipelines.objectives import diffusion_loss

DEFAULT_SAMPLING_STEPS = 100


def _timed(work: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Seconds per call of `work`, after one untimed warm-up call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def sampling_rate(unet: torch.nn.Module, batch: int, steps: int, dtype: torch.dtype, device: torch.device) -> float:
    """Images per second of guided DDIM sampling."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(build_scheduler().config)
    seconds = _timed(lambda: sample(unet, scheduler, [1] * batch, range(batch), guidance=2.0, steps=steps,
                                    dtype=dtype), device, repeats=1)
    return batch / seconds


def training_rate(unet: torch.nn.Module, batch: int, dtype: torch.dtype, device: torch.device,
                  repeats: int) -> float:
    """Training samples per second (loss, backward, Adam step) under autocast `dtype`."""
    scheduler = build_scheduler()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    size = unet.config.sample_size
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    labels = torch.arange(batch, device=device) % 11
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion_loss(predictor(unet), scheduler, x0, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    unet.train()
    rate = batch / _timed(step, device, repeats)
    unet.eval()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="fast", help="UNet preset")
    parser.add_argument("--resolution", type=int, choices=CIFAR10_RESOLUTIONS, default=32, help="image size")
    parser.add_argument("--batch", type=int, default=1000, help="images per sampling batch")
    parser.add_argument("--steps", type=int, default=DEFAULT_SAMPLING_STEPS, help="DDIM steps")
    parser.add_argument("--train-batch", type=int, default=128, help="images per training step")
    parser.add_argument("--train-repeats", type=int, default=10, help="timed training steps")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch_dtype(dtype_name)
    torch.manual_seed(0)
    unet = build_unet(args.preset, args.resolution).to(device).eval()
    on_gpu = device.type == "cuda"
    base_batch, base_train, base_dtype = ((args.batch, args.train_batch, "fp32") if on_gpu else (1, 1, dtype_name))
    sampling = sampling_rate(unet, args.batch, args.steps, dtype, device)
    sampling_base = sampling_rate(unet, base_batch, args.steps, torch_dtype(base_dtype), device)
    training = training_rate(unet, args.train_batch, dtype, device, args.train_repeats)
    training_base = training_rate(unet, base_train, torch_dtype(base_dtype), device, args.train_repeats)
    print(json.dumps({
        "bench": "ddpm", "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "threads": torch.get_num_threads(), "preset": args.preset, "parameters": parameter_count(unet),
        "image_size": args.resolution, "sampler": "DDIM", "sampling_steps": args.steps, "guidance": 2.0,
        "sampling": {"batch": args.batch, "dtype": dtype_name, "images_per_second": round(sampling, 3)},
        "sampling_baseline": {"batch": base_batch, "dtype": base_dtype, "images_per_second": round(sampling_base, 3)},
        "sampling_speedup": round(sampling / sampling_base, 3),
        "training": {"batch": args.train_batch, "dtype": dtype_name, "samples_per_second": round(training, 2)},
        "training_baseline": {"batch": base_train, "dtype": base_dtype, "samples_per_second": round(training_base, 2)},
        "training_speedup": round(training / training_base, 3),
    }))


if __name__ == "__main__":
    main()
