"""The model card (`README.md`) of a diffusion run's folder, in the layout the Hugging Face hub reads: a YAML header
(`base_model`, `library_name: diffusers`, `tags`, `pipeline_tag`) and a body with the method, what was erased, the
run's metrics, how to load it and how to reproduce it, so `huggingface-cli upload <repo> <run>` publishes a run as
it is."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from erasure.io import atomic_open

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A hub repository id (owner/name); a local path is not written as `base_model`, which the hub checks."""
SD_METRICS = ("forget_objective_before", "forget_objective_after", "steps", "train_seconds", "edit_seconds",
              "mask_density")


def _yaml(header: dict[str, Any]) -> str:
    """A flat YAML mapping of strings and string lists (each value JSON-quoted, which YAML reads as is)."""
    lines = []
    for key, value in header.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "---\n" + "\n".join(lines) + "\n---\n"


def _metrics_table(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    rows = [f"| {key} | {metrics[key]:.6g} |" if isinstance(metrics[key], float) else f"| {key} | {metrics[key]} |"
            for key in keys if metrics.get(key) is not None]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def sd_card(run: Path, config: dict[str, Any], source: str, metrics: dict[str, Any], pipeline_class: str,
            folder: str, denoiser: str) -> None:
    """Write the card of an `erasure sd` run (its config as a dict) into `run`; the erased denoiser, of class
    `denoiser`, is in `run/folder`."""
    model, method = config["model"], config["method"]
    mask = " and the saliency mask" if "mask" in metrics else ""
    concepts = metrics["concepts"]
    header = {**({"base_model": model} if HUB_ID.match(model) and not Path(model).exists() else {}),
              "library_name": "diffusers", "pipeline_tag": "text-to-image",
              "tags": ["concept-erasure", "machine-unlearning", "erasure", method, metrics.get("family", "sd")]}
    erased = "; ".join(f"'{c['forget']}' -> '{c['target'] or ''}'" for c in concepts)
    preserve = ", ".join(f"'{p}'" for p in metrics.get("preserve", [])) or "none"
    body = f"""# {concepts[0]['forget']} erased from {model} ({method})

Erased with the `erasure` toolkit, `erasure sd --method {method}`: {source}.

- Erased (forget prompt -> target prompt): {erased}
- Preserved prompts: {preserve}
- What changed: {metrics.get('scope', 'the UNet')}

{_metrics_table({**metrics, "mask_density": (metrics.get("mask") or {}).get("density")}, SD_METRICS)}
The folder holds the erased {folder} (`{folder}/`, diffusers format){mask};
`manifest.json` has the full configuration, the seed and the package versions, `metrics.json` every metric.

```python
from diffusers import {pipeline_class}, {denoiser}

{folder} = {denoiser}.from_pretrained("<this repository or folder>", subfolder="{folder}")
pipe = {pipeline_class}.from_pretrained("{model}", {folder}={folder})
```

Reproduce: save this run's configuration as `config.yaml` and run `erasure sd --config config.yaml`:

```yaml
{json.dumps(config, indent=2)}
```
"""
    with atomic_open(run / CARD, "w") as handle:
        handle.write(_yaml(header) + "\n" + body)


def ddpm_card(run: Path, source_run: str, metrics: dict[str, Any]) -> None:
    """Write the card of an `erasure ddpm unlearn` run into `run`."""
    header = {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
              "tags": ["ddpm", "class-conditional", "cifar10", "machine-unlearning", "erasure", metrics["method"]]}
    remap = f", remapped to '{metrics['remap_class']}'" if metrics.get("remap_class") else ""
    method = metrics["method"]
    body = f"""# CIFAR-10 class '{metrics['forget_class']}' unlearned from a class-conditional DDPM ({method})

Unlearned with the `erasure` toolkit, `erasure ddpm unlearn --method {metrics['method']}` from the
`erasure ddpm train` run `{source_run}`: class '{metrics['forget_class']}'{remap}.

{_metrics_table(metrics, ('forget_objective_before', 'forget_objective_after', 'mask_density', 'steps',
                          'train_seconds'))}
The folder holds the UNet (`unet/`, a diffusers `UNet2DModel` with 11 class embeddings, index 10 the null class
of classifier-free guidance) and its scheduler; `manifest.json` has the configuration, seed and versions.

```python
from diffusers import UNet2DModel

unet = UNet2DModel.from_pretrained("<this repository or folder>", subfolder="unet")
```
"""
    with atomic_open(run / CARD, "w") as handle:
        handle.write(_yaml(header) + "\n" + body)
