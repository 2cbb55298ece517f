"""Attacks on erased text-to-image models, by name (`erasure eval attack --attack NAME`)."""
from __future__ import annotations

from pipelines.attacks.base import Attack
from pipelines.attacks.p4d import P4D
from pipelines.attacks.paraphrase import Paraphrase
from pipelines.attacks.ringabell import RingABell
from pipelines.attacks.unlearndiffatk import UnlearnDiffAtk

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (Paraphrase, UnlearnDiffAtk, P4D, RingABell)}
