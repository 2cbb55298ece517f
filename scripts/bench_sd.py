"""Speed of `erasure sd`'s training step against a SalUn-reference-style step, and guided generation.
Prints one JSON line.

Both steps train the same UNet on the same random latents and text embeddings, batch B forget + B retain rows,
SalUn's objective (forget rows regress onto the UNet's own remap-prompt prediction, retain rows onto their
noise with weight alpha) and a 50% mask:
- erasure: the real `erasure sd` step (the `Trainer`'s step over `Eraser.loss_at`: one fused UNet forward over
  all rows, bf16 autocast on CUDA, `masked_step` with clipping, AdamW, unmasked weights protected);
- reference: as the SalUn reference code does it, fp32, separate forward passes for the forget, remap and
  retain terms, the mask applied by multiplying gradients, then Adam.
`--size sd` uses SD v1.4's architecture with random weights (see bench_sample.py); on a CPU run it with
`--steps 1 --warmup 0 --batch-size 1` and read seconds.

    python scripts/bench_sd.py --size sd --batch-size 8                                  # on a GPU
    python scripts/bench_sd.py --size tiny --batch-size 2 --gen-steps 2                  # CPU smoke
    python scripts/bench_sd.py --size sd --batch-size 1 --steps 1 --warmup 0 --gen-images 0  # CPU, SD-v1 size
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_sample import PROMPTS, sd14_random_pipeline
from erasure.accel import make_accelerator
from erasure.config import load_config
from erasure.io import RunDir
from erasure.prompts import Prompt
from erasure.saliency import Mask
from pipelines.sampling import generate_batch
from pipelines.sd_config import SDEraseConfig
from pipelines.stable_diffusion import Conditions, Eraser, Latents
from pipelines.tiny import build_tiny_pipeline

ALPHA, LR, GRAD_CLIP = 0.1, 1e-5, 1.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_inputs(unet: torch.nn.Module, batch: int, latent: int, device: torch.device) -> tuple[Latents, Latents,
                                                                                               Conditions, Mask]:
    """Forget and retain latents (B each), forget/remap/null/retain embeddings and a 50% mask, all seeded."""
    gen = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim

    def latents() -> Latents:
        return Latents(torch.randn(batch, 4, latent, latent, generator=gen).to(device),
                       torch.zeros(batch, 4, latent, latent, device=device),
                       torch.zeros(batch, dtype=torch.long, device=device))

    forget, retain = latents(), latents()
    forget_text, target, null, retain_text = (torch.randn(1, 77, width, generator=gen).to(device) for _ in range(4))
    mask = Mask({name: torch.rand(p.shape, generator=gen) < 0.5 for name, p in unet.named_parameters()})
    return forget, retain, Conditions(forget_text, target, null, retain_text), mask


def erasure_step(pipe, inputs: tuple, batch: int, autocast: bool, run_dir: Path) -> Callable[[int], None]:
    """`erasure sd`'s optimizer step `i` (the one call site to repoint when the loop moves)."""
    forget, retain, conditions, mask = inputs
    config = load_config(SDEraseConfig, None, {"concept": "nudity", "method": "salun", "model": "bench",
                                               "batch_size": batch, "alpha": ALPHA, "lr": LR,
                                               "grad_clip": GRAD_CLIP, "out": str(run_dir)})
    accelerator = make_accelerator(mixed_precision="bf16" if autocast else "no")
    eraser = Eraser(config, pipe, accelerator, RunDir(run_dir), {"forget": forget, "retain": retain}, conditions)
    eraser.build_mask = lambda: mask  # a given random mask instead of computing one
    eraser.prepare()
    eraser.unet.train()
    return lambda i: eraser.trainer._step(eraser.loss_at, i)


def reference_step(pipe, inputs: tuple) -> Callable[[int], None]:
    """SalUn's reference step: fp32, three forward passes, gradients multiplied by the mask, Adam."""
    forget, retain, conditions, mask = inputs
    unet, scheduler = pipe.unet, pipe.scheduler
    weights = {name: keep.to(p.device, torch.float32) for (name, p), keep in
               zip(unet.named_parameters(), mask.masks.values(), strict=True)}
    optimizer = torch.optim.Adam(unet.parameters(), lr=LR)
    batch = forget.x0.shape[0]

    def noised(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=x0.device)
        return scheduler.add_noise(x0, noise, t), noise, t

    def step(_: int) -> None:
        x_t, _noise, t = noised(forget.x0)
        forget_out = unet(x_t, t, encoder_hidden_states=conditions.forget.expand(batch, -1, -1)).sample
        remap_out = unet(x_t, t, encoder_hidden_states=conditions.target.expand(batch, -1, -1)).sample.detach()
        r_t, r_noise, r_time = noised(retain.x0)
        retain_out = unet(r_t, r_time, encoder_hidden_states=conditions.retain[retain.prompt]).sample
        loss = F.mse_loss(forget_out, remap_out) + ALPHA * F.mse_loss(retain_out, r_noise)
        optimizer.zero_grad()
        loss.backward()
        for name, p in unet.named_parameters():
            if p.grad is not None:
                p.grad *= weights[name]
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def seconds_per_step(step: Callable[[int], None], args: argparse.Namespace, device: torch.device) -> float:
    for i in range(args.warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(device)
    return (time.perf_counter() - start) / args.steps


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def bench_training(pipe, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per step of both, each from the same starting weights, and their ratio."""
    start_state = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    inputs = random_inputs(pipe.unet, args.batch_size, args.resolution // 8, device)
    results = {}
    for name in ("reference", "erasure"):
        pipe.unet.load_state_dict(start_state)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with tempfile.TemporaryDirectory() as tmp:
            step = (reference_step(pipe, inputs) if name == "reference"
                    else erasure_step(pipe, inputs, args.batch_size, args.autocast, Path(tmp) / "run"))
            seconds = seconds_per_step(step, args, device)
        del step
        results[name] = {"seconds_per_step": round(seconds, 4),
                         "samples_per_s": round(2 * args.batch_size / seconds, 3),
                         "peak_memory_gib": peak_memory_gib(device)}
    pipe.unet.load_state_dict(start_state)
    return results


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
    parser.add_argument("--batch-size", type=int, default=8, help="forget rows (and as many retain rows) per step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before timing")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="erasure's autocast; auto is bf16 on CUDA and fp32 on CPU (the reference is fp32)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default 512 sd, 32 tiny)")
    parser.add_argument("--gen-images", type=int, default=8, help="images in the generation batch (0: skip)")
    parser.add_argument("--gen-steps", type=int, default=50, help="denoising steps when generating")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.autocast = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    args.resolution = args.resolution or (512 if args.size == "sd" else 32)
    pipe = (sd14_random_pipeline() if args.size == "sd" else build_tiny_pipeline()).to(device)
    pipe.set_progress_bar_config(disable=True)
    train = bench_training(pipe, args, device)
    pipe.unet.eval()
    generation = bench_generation(pipe, args, device) if args.gen_images else None
    erasure, reference = train["erasure"]["seconds_per_step"], train["reference"]["seconds_per_step"]
    print(json.dumps({
        "figure": "erasure sd training step vs a SalUn-reference-style step (seconds per step), "
                  "and guided generation images/s",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "config": {"size": args.size, "resolution": args.resolution, "batch_size": args.batch_size,
                   "erasure_autocast_bf16": args.autocast, "mask_density": 0.5, "steps": args.steps,
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "torch": torch.__version__},
        "value": erasure, "unit": "seconds/step",
        "baseline": {"what": "SalUn-reference-style step (fp32, 3 forward passes, gradient * mask)",
                     "value": reference},
        "ratio": round(reference / erasure, 3),
        "train": train, "generation": generation,
    }))


if __name__ == "__main__":
    main()
