"""P4D (Chin et al., ICML 2024) as Diffusion-MU-Attack runs it (`src/attackers/hard_prompt_.py` with
`src/tasks/P4D_.py`): prepended tokens that make the erased model predict what the base model predicts for
the original prompt.

Each of the k prepended tokens is a free embedding vector, started at a random token's embedding. A step
conditions the erased UNet on the tokens nearest (cosine similarity) to the vectors; the gradient with respect
to those nearest embeddings is applied to the vectors themselves (straight-through, as the reference's
hard-prompt projection). The goal is the base UNet's prediction on the same noisy latent under the original
prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.attacks.base import Target
from pipelines.attacks.prefix import PrefixTokenAttack
from pipelines.attacks.text import encode_ids


def nearest_tokens(vectors: Tensor, table: Tensor) -> Tensor:
    """The id of the vocabulary embedding of highest cosine similarity to each vector."""
    return (F.normalize(vectors.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T).argmax(-1)


class P4D(PrefixTokenAttack):
    """Prepend k tokens that make the erased UNet predict the base UNet's noise for the original prompt."""

    name = "p4d"

    def start(self, table: Tensor, generator: torch.Generator) -> Tensor:
        ids = torch.randint(0, table.shape[0], (self.settings.k,), generator=generator)
        return table[ids.to(table.device)].float().clone()

    def embed(self, parameter: Tensor, table: Tensor, generator: torch.Generator) -> Tensor:
        vectors = parameter.to(table.dtype)
        return vectors + (table[nearest_tokens(parameter, table)] - vectors).detach()

    def chosen(self, parameter: Tensor, table: Tensor) -> Tensor:
        return nearest_tokens(parameter, table)

    def goal(self, target: Target, noisy: Tensor, timestep: int, noise: Tensor, original: Tensor,
             x0: Tensor) -> Tensor:
        base = target.base()
        with torch.no_grad():
            condition = encode_ids(base.text_encoder, original)
            prediction = base.unet(noisy, timestep, encoder_hidden_states=condition).sample
        target.cost.unet_calls += 1
        target.cost.text_encoder_calls += 1
        return prediction
