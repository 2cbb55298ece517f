"""A low-rank (LoRA) fit of what an erasure changed, in the diffusers/peft format `pipe.load_lora_weights` reads.

For every Linear and Conv2d layer of the UNet whose weight changed, the change dW = W_erased - W_base
(a conv kernel flattened to out x in*kh*kw) is factored by SVD, dW ~ (U_r S_r)(V_r^T): `lora_B` = U_r S_r,
`lora_A` = V_r^T, rank r = min(--rank, full rank); alpha = r, so peft's scale is 1. A changed bias travels
exactly as `lora_B.bias` with `bias=True` (peft's `lora_bias`: diffusers loads it, but cannot fuse it into a
layer without a bias, and A1111/ComfyUI ignore it), so by default biases are left out. Parameters the file
does not carry (normalisation layers, biases) are reported with their relative change and stay at the base
values. At full rank the fit is exact up to
float rounding; the report gives per layer the rank and the relative error ||dW - BA||_F / ||dW||_F.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def _factor(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, int, float]:
    """B (out x r), A (r x in), the rank used and the relative Frobenius error of B @ A (in float64)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    norm = torch.linalg.norm(delta)
    error = float(torch.linalg.norm(delta - b @ a) / norm) if norm > 0 else 0.0
    return b, a, r, error


def lora_from_difference(base: Mapping[str, Tensor], erased: nn.Module, rank: int, *, bias: bool = False,
                         prefix: str = "unet") -> tuple[dict[str, Tensor], list[dict[str, Any]], list[dict[str, Any]]]:
    """(state dict with peft keys under `prefix` (the pipeline's denoiser: 'unet', or 'transformer' for SD3), one
    report row per fitted layer, rows of left-out parameters); `bias` also carries the changed biases of those
    layers."""
    tensors: dict[str, Tensor] = {}
    layers: list[dict[str, Any]] = []
    covered: set[str] = set()
    for name, module in erased.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        covered.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False) if p == "weight" or bias)
        weight, old = module.weight.detach().cpu(), base[f"{name}.weight"]
        delta = weight.double() - old.double()
        bias_changed = bias and module.bias is not None and not torch.equal(module.bias.detach().cpu(),
                                                                            base[f"{name}.bias"])
        if not bias_changed and not torch.any(delta):
            continue
        b, a, used, error = _factor(delta.reshape(delta.shape[0], -1), rank)
        if isinstance(module, nn.Conv2d):
            b, a = b[:, :, None, None], a.reshape(used, *weight.shape[1:])
        key = f"{prefix}.{name}"
        tensors[f"{key}.lora_B.weight"] = b.to(weight.dtype).contiguous()
        tensors[f"{key}.lora_A.weight"] = a.to(weight.dtype).contiguous()
        if bias and module.bias is not None:
            tensors[f"{key}.lora_B.bias"] = (module.bias.detach().cpu() - base[f"{name}.bias"]).contiguous()
        layers.append({"layer": name, "rank": used, "max_rank": min(delta.shape[0], delta[0].numel()),
                       "relative_error": error})
    left_out = []
    for name, value in erased.state_dict().items():
        value, old = value.detach().cpu(), base[name]
        if name not in covered and not torch.equal(value, old):
            change, size = (float(torch.linalg.norm(t.double())) for t in (value - old, old))
            left_out.append({"parameter": name, "change_norm": change,
                             "relative_change": change / size if size > 0 else None})
    if any(key.endswith("lora_B.bias") for key in tensors):  # peft then gives every adapted layer a bias
        for row in layers:
            b = tensors[f"{prefix}.{row['layer']}.lora_B.weight"]
            tensors.setdefault(f"{prefix}.{row['layer']}.lora_B.bias", torch.zeros(b.shape[0], dtype=b.dtype))
    return tensors, layers, left_out


def fused_state(base: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The base denoiser state with each layer's B @ A (and LoRA bias) added: what loading and fusing the file
    gives (keys under any one prefix, `unet.` or `transformer.`)."""
    state = dict(base)
    for key, b in tensors.items():
        if not key.endswith(".lora_B.weight"):
            continue
        prefix, _, rest = key.partition(".")
        name = rest.removesuffix(".lora_B.weight")
        weight, a = base[f"{name}.weight"], tensors[f"{prefix}.{name}.lora_A.weight"]
        state[f"{name}.weight"] = weight + (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
        bias = tensors.get(f"{prefix}.{name}.lora_B.bias")
        if bias is not None and f"{name}.bias" in base:
            state[f"{name}.bias"] = base[f"{name}.bias"] + bias
    return state


PROBE_PROMPTS = ("a photo", "a photo of a nude person")


@torch.no_grad()
def prediction_error(pipe: Any, base: Mapping[str, Tensor], fused: Mapping[str, Tensor], seed: int = 0) -> float:
    """||eps_lora - eps_erased|| / ||eps_erased - eps_base|| on seeded latents under PROBE_PROMPTS: the share of
    the erasure's change of the prediction that the LoRA misses (0: all of it kept). The pipeline's denoiser (the
    erased one) is restored afterwards."""
    from pipelines.families import denoiser, text_conditioning

    unet = denoiser(pipe)
    config, param = unet.config, next(unet.parameters())
    text = text_conditioning(pipe)
    generator = torch.Generator().manual_seed(seed)
    size = config.get("sample_size", 8)  # a UNet's or SD3's native latent size; FLUX's transformer has none
    sample = torch.randn(2, pipe.vae.config.latent_channels, size, size, generator=generator)
    inputs = (sample.to(param), torch.tensor([100, 700], device=param.device),
              text.encode(list(PROBE_PROMPTS)).to(param))
    erased = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    outputs = []
    for state in (erased, base, fused):
        unet.load_state_dict(state)
        outputs.append(text.predictor(unet)(*inputs).double())
    unet.load_state_dict(erased)
    change = torch.linalg.norm(outputs[0] - outputs[1])
    return float(torch.linalg.norm(outputs[2] - outputs[0]) / change) if change > 0 else 0.0


def summarise(layers: list[dict[str, Any]], left_out: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The export's metrics: requested rank, layer count, worst and mean relative error, left-out parameters."""
    errors = [row["relative_error"] for row in layers]
    return {"rank": rank, "layers": len(layers), "max_relative_error": max(errors, default=0.0),
            "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
            "parameters_left_out": len(left_out), "per_layer": layers, "left_out": left_out}
