"""Speed of `erasure sd`: masked UNet training samples/s (with FLOPs, MFU, peak memory) per batch size, and
guided image generation images/s. Prints one JSON line.

A training sample is what SalUn's SD loop costs per image: one UNet forward + backward on a noised 64x64
latent (512x512 image) with its text embedding under autocast, then a masked AdamW step (50% mask,
`protect_unmasked`). `--size sd` uses SD v1.4's architecture with random weights (see bench_sample.py).

    python scripts/bench_sd.py --size sd --batch-sizes 1,8,32                 # on a GPU (bf16 autocast)
    python scripts/bench_sd.py --size tiny --batch-sizes 1,8 --gen-steps 2    # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench_sample import PROMPTS, sd14_random_pipeline
from erasure.prompts import Prompt
from erasure.saliency import Mask, masked_parameters
from pipelines.sampling import generate_batch
from pipelines.tiny import build_tiny_pipeline

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocated, or the process's VmHWM on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """A masked AdamW step of the UNet on random latents and text embeddings of one batch size."""

    def __init__(self, unet: torch.nn.Module, batch: int, latent: int, autocast: bool, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        self.unet, self.autocast, self.device = unet, autocast, device
        self.x = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
        self.noise = torch.randn_like(self.x)
        self.t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        self.text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device)
        self.mask = Mask({name: torch.rand(p.shape, generator=generator) < 0.5 for name, p in unet.named_parameters()})
        self.optimizer = torch.optim.AdamW(masked_parameters(unet, self.mask), lr=1e-5)
        self.hook = self.mask.protect_unmasked(unet, self.optimizer)

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.unet(self.x, self.t, encoder_hidden_states=self.text).sample
        F.mse_loss(out.float(), self.noise).backward()
        self.mask.apply_to_grads(self.unet)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.hook.remove()


def bench_training(unet: torch.nn.Module, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """samples/s, TFLOP per sample, achieved TFLOPS, MFU and peak memory at one batch size."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = TrainStep(unet, batch, args.latent, args.autocast, device)
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    step.close()
    tflops = counter.get_total_flops() / seconds / 1e12
    peak = peak_tflops(device)
    return {"batch_size": batch, "samples_per_s": round(batch / seconds, 3),
            "gflop_per_sample": round(counter.get_total_flops() / batch / 1e9, 3),
            "achieved_tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None,
            "peak_memory_gib": round(peak_memory_gib(device), 3)}


def bench_generation(pipe, args: argparse.Namespace, device: torch.device) -> dict:
    """images/s of guided generation of one batch (per-image generators, as the forget/retain sets use)."""
    prompts = [Prompt(i, PROMPTS[i % len(PROMPTS)], 1000 + i, 7.5) for i in range(args.gen_images)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        generate_batch(pipe, prompts[:1], height=args.resolution, width=args.resolution, steps=1)
        sync(device)
        start = time.perf_counter()
        generate_batch(pipe, prompts, height=args.resolution, width=args.resolution, steps=args.gen_steps)
        sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": round(args.gen_images / seconds, 4), "images": args.gen_images,
            "steps": args.gen_steps, "resolution": args.resolution, "guidance": 7.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd"), default="sd", help="pipeline architecture")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated training batch sizes")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast dtype; auto is bf16 on CUDA and fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default 512 sd, 32 tiny)")
    parser.add_argument("--gen-images", type=int, default=8, help="images in the generation batch (0: skip)")
    parser.add_argument("--gen-steps", type=int, default=50, help="denoising steps when generating")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.autocast = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    args.resolution = args.resolution or (512 if args.size == "sd" else 32)
    args.latent = args.resolution // 8
    pipe = (sd14_random_pipeline() if args.size == "sd" else build_tiny_pipeline()).to(device)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    train = [bench_training(unet, int(b), args, device) for b in args.batch_sizes.split(",")]
    best = max(train, key=lambda r: r["samples_per_s"])
    unet.eval()
    generation = bench_generation(pipe, args, device) if args.gen_images else None
    print(json.dumps({
        "figure": "erasure sd masked training samples/s (best batch size) and guided generation images/s",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "config": {"size": args.size, "resolution": args.resolution, "autocast_bf16": args.autocast,
                   "gradient_checkpointing": args.gradient_checkpointing, "mask_density": 0.5,
                   "unet_parameters": sum(p.numel() for p in unet.parameters()), "torch": torch.__version__},
        "value": best["samples_per_s"], "unit": "samples/s",
        "baseline": {"what": "batch size 1", "value": train[0]["samples_per_s"]},
        "ratio": round(best["samples_per_s"] / train[0]["samples_per_s"], 3),
        "train": train, "generation": generation,
    }))


if __name__ == "__main__":
    main()
