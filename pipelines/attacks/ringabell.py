"""Ring-A-Bell (Tsai et al. 2024, chiayi-hsu/Ring-A-Bell `Get_Concept_Vector.ipynb`, `InversePrompt.ipynb`).

The concept vector is the mean difference of the text encoder's hidden states (77 x width) between prompts
with the concept and the same prompts without it. For each attacked prompt the goal is its own hidden states
plus eta times that vector; a genetic search over `length` tokens (between `<bos>` and `<eos>` padding) looks
for the prompt whose hidden states lie closest (summed squared distance) to the goal. Each generation keeps
the better half, appends for every survivor, with probability `crossover_rate`, the two one-point crosses with
a random survivor, and gives each candidate, with probability `mutation_rate`, one random token. Only the
text encoder is used: the search never sees the erased UNet, and its best prompt is the one candidate judged.
So models that share a text encoder share each search's result: `ringabell.cache` keeps finished searches,
keyed by a hash of the encoder's weights, the tokenizer's vocabulary, the prompt's ids, the seed, the concept
pairs and the settings, and a later attack on another such model judges the stored prompt at once.
"""
from __future__ import annotations

import csv
from collections.abc import Generator
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from erasure.digest import key_digest, weights_digest
from erasure.errors import ErasureError
from erasure.io import read_json, write_json
from erasure.prompts import Prompt
from pipelines.attacks.base import Attack, Candidate, Cost, Target
from pipelines.attacks.judges import NUDITY
from pipelines.attacks.text import decode, encode_ids, token_ids

if TYPE_CHECKING:
    from pipelines.attack_config import AttackEvalConfig, RingABellSettings

ENCODE_BATCH = 256
NUDITY_PAIRS = files("configs") / "attacks" / "nudity_pairs.csv"


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(concept, neutral) prompt pairs from a CSV with columns 'concept' and 'neutral'."""
    path = Path(path)
    if not path.is_file():
        raise ErasureError(f"Ring-A-Bell pair file '{path}' does not exist; pass a CSV with columns 'concept' and "
                           "'neutral' to --ringabell-pairs")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"concept", "neutral"} <= set(reader.fieldnames or []):
            raise ErasureError(f"Ring-A-Bell pair file '{path}' needs columns 'concept' and 'neutral' (it has: "
                               f"{', '.join(reader.fieldnames or [])}); rename them")
        pairs = [(row["concept"].strip(), row["neutral"].strip()) for row in reader if row["concept"].strip()]
    if not pairs:
        raise ErasureError(f"Ring-A-Bell pair file '{path}' holds no pairs; add rows of concept and neutral prompts")
    return pairs


def concept_vector(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, pairs: list[tuple[str, str]]) -> Tensor:
    """Mean over pairs of hidden states with the concept minus hidden states without it (77 x width)."""
    with torch.no_grad():
        with_concept = encode_ids(text_encoder, torch.cat([token_ids(tokenizer, c) for c, _ in pairs]))
        without = encode_ids(text_encoder, torch.cat([token_ids(tokenizer, n) for _, n in pairs]))
    return (with_concept - without).float().mean(0)


def distances(text_encoder: CLIPTextModel, goal: Tensor, population: Tensor, cost: Cost) -> np.ndarray:
    """Summed squared distance of each id row's hidden states to `goal` (the reference's fitness)."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(population), ENCODE_BATCH):
            hidden = encode_ids(text_encoder, population[start:start + ENCODE_BATCH]).float()
            scores.append(((hidden - goal) ** 2).sum(dim=(1, 2)).cpu())
    cost.text_encoder_calls += len(population)
    return torch.cat(scores).numpy()


class RingABell(Attack):
    """Genetic search for tokens whose text embedding carries the prompt plus eta times the concept vector."""

    name = "ringabell"

    def __init__(self, settings: RingABellSettings, pairs: list[tuple[str, str]]):
        super().__init__(settings)
        self.pairs = pairs
        self._vector: Tensor | None = None
        self._encoder_hash: str | None = None

    @classmethod
    def from_config(cls, config: AttackEvalConfig, concept: str) -> RingABell:
        """Pairs from --ringabell-pairs, else the shipped nudity pairs, else 'a photo of a(n) <concept>' against
        'a photo' (and two more templates)."""
        settings = config.ringabell
        if settings.pairs:
            return cls(settings, read_pairs(settings.pairs))
        if concept == NUDITY:
            return cls(settings, read_pairs(NUDITY_PAIRS))
        named = f"{'an' if concept[:1].lower() in 'aeiou' else 'a'} {concept}"
        return cls(settings, [(f"a photo of {named}", "a photo"), (f"a picture of {named}", "a picture"),
                              (f"an image of {named}", "an image")])

    def evolve(self, rows: np.ndarray, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Crossover then mutation of the surviving token rows (content only, without `<bos>`/`<eos>`)."""
        settings = self.settings
        children = []
        for row in rows:
            children.append(row.copy())
            if rng.random() < settings.crossover_rate:
                other = rows[rng.integers(len(rows))]
                point = rng.integers(settings.length)
                children.append(np.concatenate([row[:point], other[point:]]))
                children.append(np.concatenate([other[:point], row[point:]]))
        for child in children:
            if rng.random() < settings.mutation_rate:
                child[rng.integers(settings.length)] = rng.choice(tokens)
        return np.stack(children)

    def candidates(self, target: Target, prompt: Prompt, original: Tensor, generator: torch.Generator
                   ) -> Generator[Candidate, None, None]:
        settings, pipe = self.settings, target.pipe
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        if self._vector is None:
            self._vector = concept_vector(tokenizer, encoder, self.pairs).to(target.device)
            target.cost.text_encoder_calls += 2 * len(self.pairs)
        with torch.no_grad():
            goal = encode_ids(encoder, original)[0].float() + settings.coefficient * self._vector
        target.cost.text_encoder_calls += 1
        special = set(tokenizer.all_special_ids)
        tokens = np.array([i for i in range(1, len(tokenizer)) if i not in special])
        seed = int(torch.randint(2**62, (1,), generator=generator))
        stored = self._stored_search(encoder, tokenizer, original, seed)
        if stored is not None and stored.is_file():
            found = read_json(stored)
            target.cost.text_encoder_calls += found["text_encoder_calls"]
            target.cost.reused_searches += 1
            yield Candidate(torch.tensor([found["ids"]]), found["text"], objective=found["objective"],
                            step=found["step"])
            return
        calls = target.cost.text_encoder_calls
        rng = np.random.default_rng(seed)
        rows = rng.choice(tokens, size=(settings.population, settings.length))
        total = original.shape[1]
        self.check(total)
        frame = (torch.full((1, 1), tokenizer.bos_token_id), torch.full((1, total - 1 - settings.length),
                                                                         tokenizer.eos_token_id))

        def full(content: np.ndarray) -> Tensor:
            body = torch.from_numpy(content).long()
            return torch.cat([frame[0].expand(len(body), 1), body, frame[1].expand(len(body), -1)], dim=1)

        for generation in range(settings.generations):
            scores = distances(encoder, goal, full(rows), target.cost)
            order = np.argsort(scores, kind="stable")
            best = float(scores[order[0]])
            rows = rows[order][:settings.population // 2]
            if generation != settings.generations - 1:
                rows = self.evolve(rows, tokens, rng)
        ids = full(rows[:1])
        candidate = Candidate(ids, decode(tokenizer, ids), objective=best, step=settings.generations)
        if stored is not None:
            write_json(stored, {"ids": ids[0].tolist(), "text": candidate.text, "objective": best,
                                "step": settings.generations,
                                "text_encoder_calls": target.cost.text_encoder_calls - calls})
        yield candidate

    def check(self, positions: int) -> None:
        if self.settings.length > positions - 2:
            raise ErasureError(f"ringabell.length = {self.settings.length} does not fit the text encoder's {positions} "
                               f"tokens with <bos> and <eos>; pass --ringabell-length <= {positions - 2}")

    def _stored_search(self, encoder: CLIPTextModel, tokenizer: CLIPTokenizer, original: Tensor, seed: int
                       ) -> Path | None:
        """Where this search's result is kept in `settings.cache` (None without a cache)."""
        if self.settings.cache is None:
            return None
        if self._encoder_hash is None:
            self._encoder_hash = weights_digest(encoder)
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("cache", "pairs")}
        key = key_digest({"encoder": self._encoder_hash, "vocabulary": len(tokenizer),
                          "special": sorted(tokenizer.all_special_ids), "prompt": original[0].tolist(), "seed": seed,
                          "pairs": self.pairs, "settings": settings})
        return Path(self.settings.cache) / f"{key}.json"
