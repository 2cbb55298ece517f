"""Diffusion erasure methods by name: one module each (see `base` for the seam), registered here.

Adding a method: write `pipelines/methods/<name>.py` with its settings dataclass, implementation and `SPEC`, add
it to `_SD_MODULES` (and `DDPM_METHODS` where it applies), a test, and a line in the README's method table.
`--method` choices, `--help` and the config's per-method sections come from this registry.
"""
from __future__ import annotations

from pipelines.methods import ca, esd, ga, rece, rl, salun, uce
from pipelines.methods.base import MethodSpec

_SD_MODULES = (salun, esd, ga, ca, uce, rece)
SD_METHODS: dict[str, MethodSpec] = {spec.name: spec for module in _SD_MODULES
                                     for spec in getattr(module, "SPECS", None) or (module.SPEC,)}
DDPM_METHODS: dict[str, MethodSpec] = {"salun": salun.DDPM_SPEC, "ga": ga.SPEC, "rl": rl.SPEC,
                                       "esd": esd.SPECS[0], "ca": ca.DDPM_SPEC}
"""The methods of `erasure ddpm unlearn`: a class-conditional DDPM has no text encoder, so no cross-attention edit
(uce, rece) and no cross-attention scope (esd-x, esd-u); salun, ga and rl restate the SalUn DDPM reference, esd
and ca their papers' objectives over class labels."""


def method_sections(registry: dict[str, MethodSpec]) -> dict[str, type]:
    """The config section of each method's settings, by section name (variants of a method share one)."""
    return {spec.section_name: spec.settings for spec in registry.values()}


def method_help(registry: dict[str, MethodSpec]) -> str:
    """'name (summary)' for every method, for `--help`."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in registry.items())
