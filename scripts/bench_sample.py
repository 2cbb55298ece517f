"""Throughput of `erasure sample`'s generation path: batched vs one image at a time. Prints one JSON line.

`--size sd` builds a randomly initialised pipeline with SD v1.4's architecture (UNet, VAE and text
encoder from their published configs; the byte-level test tokenizer, which changes only the size of
the token-embedding table), so the compute matches SD v1.4 without downloading weights.
`--size tiny` uses the toy test pipeline. Both run `pipelines.sampling.generate_batch`: per-image CPU
generators, classifier-free guidance, output_type="np" and the explicit uint8 conversion.

    python scripts/bench_sample.py --size sd --steps 50 --n 8            # on a GPU (bf16)
    python scripts/bench_sample.py --size sd --steps 2 --n 2 --warmup 0  # what fits on a laptop CPU
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from erasure.accel import resolve_device, resolve_dtype
from erasure.prompts import Prompt
from pipelines.sampling import generate_batch
from pipelines.tiny import build_tiny_pipeline, tiny_tokenizer

SD14_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD14_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
}
SD14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolour of a lighthouse at dusk",
           "a bowl of fruit on a wooden table", "a city street in the rain at night")


def sd14_random_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD v1.4's architecture with random weights (859.5M-parameter UNet)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD14_UNET)
        vae = AutoencoderKL(**SD14_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **SD14_TEXT))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def timed(pipe: StableDiffusionPipeline, groups: list[list[Prompt]], size: int, steps: int,
          device: torch.device) -> float:
    """Seconds to generate every group (one pipeline call per group)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for group in groups:
        generate_batch(pipe, group, height=size, width=size, steps=steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd"), default="sd", help="pipeline architecture")
    parser.add_argument("--height", type=int, default=512, help="image height = width in pixels")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--n", type=int, default=4, help="images per measurement (one batch of n vs n of 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--warmup", type=int, default=1, help="untimed one-step calls before measuring")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = sd14_random_pipeline() if args.size == "sd" else build_tiny_pipeline()
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = [Prompt(i, PROMPTS[i % len(PROMPTS)], 1000 + i, args.guidance) for i in range(args.n)]
    for _ in range(args.warmup):
        generate_batch(pipe, prompts, height=args.height, width=args.height, steps=1)
    batched = timed(pipe, [prompts], args.height, args.steps, device)
    single = timed(pipe, [[p] for p in prompts], args.height, args.steps, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({
        "figure": "sample throughput (images/s), one batch of n vs n batches of 1",
        "device": where,
        "config": {"size": args.size, "height": args.height, "width": args.height, "steps": args.steps, "n": args.n,
                   "guidance": args.guidance, "dtype": str(dtype).removeprefix("torch."),
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                   "scheduler": type(pipe.scheduler).__name__, "torch": torch.__version__},
        "value": round(args.n / batched, 5),
        "unit": "images/s",
        "baseline": {"what": "one image per call", "value": round(args.n / single, 5)},
        "ratio": round(single / batched, 3),
        "seconds": {"batched": round(batched, 3), "one_by_one": round(single, 3)},
    }))


if __name__ == "__main__":
    main()
