"""Conformance: the attacks against plain-torch statements of their references.

UnlearnDiffAtk: OPTML-Group/Diffusion-MU-Attack `src/attackers/text_grad_.py` (`bisection`, `STERandSelect`, the
Adam step on the vocabulary distribution) with `src/tasks/classifier_.py` (`sampled_t`, `get_loss`:
MSE(noise, eps_erased(x_t, t, c_adv))). P4D: `src/attackers/hard_prompt_.py` (`project`: nearest token by
cosine similarity; the gradient at the projected embeddings is applied to the free ones) with `src/tasks/P4D_.py`
(MSE(eps_base(x_t, t, c_prompt), eps_erased(x_t, t, c_adv))). Ring-A-Bell: `InversePrompt.ipynb` (`fitness`) and
`Get_Concept_Vector.ipynb`. One optimisation step of ours is compared with the restated step from the same draws.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.attack_config import P4DSettings, RingABellSettings, UnlearnDiffAtkSettings
from pipelines.attacks.base import Cost, Target
from pipelines.attacks.p4d import P4D
from pipelines.attacks.prefix import alphas_cumprod, image_latent, spaced_timesteps
from pipelines.attacks.ringabell import concept_vector, distances
from pipelines.attacks.text import encode_embeddings, encode_ids, token_ids, vocabulary
from pipelines.attacks.unlearndiffatk import UnlearnDiffAtk, project_simplex
from pipelines.tiny import build_tiny_pipeline

PROMPT = "a nude person"


def reference_bisection(a: torch.Tensor, eps: float = 1.0, xi: float = 1e-5, ub: float = 1.0) -> torch.Tensor:
    """text_grad_.py `bisection`, one row."""
    pa = torch.clip(a, 0, ub)
    if abs(float(pa.sum()) - eps) <= xi:
        return pa
    mu_l, mu_u = float((a - 1).min()), float(a.max())
    mu_a = (mu_u + mu_l) / 2
    while abs(mu_u - mu_l) > xi:
        mu_a = (mu_u + mu_l) / 2
        gu = float(torch.clip(a - mu_a, 0, ub).sum()) - eps
        gu_l = float(torch.clip(a - mu_l, 0, ub).sum()) - eps + 1e-8
        if gu == 0:
            break
        if gu * gu_l < 0:
            mu_u = mu_a
        else:
            mu_l = mu_a
    return torch.clip(a - mu_a, 0, ub)


def test_simplex_projection_and_timesteps_match_the_reference() -> None:
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 0.3
    rows[0] = torch.full((40,), 1 / 40)
    ours = project_simplex(rows)
    for row, projected in zip(rows, ours, strict=True):
        assert torch.allclose(projected, reference_bisection(row), atol=1e-4)
    for n in (50, 10, 7):
        start = 1000 // n // 2
        assert spaced_timesteps(1000, n) == list(range(start, 1000, 1000 // n))[:n]


@pytest.fixture(scope="module")
def setup():
    base, erased = build_tiny_pipeline(), build_tiny_pipeline(seed=1)
    for pipe in (base, erased):
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return base, erased, image


class Captured:
    """Records the parameter after each step (after the projection of UnlearnDiffAtk)."""

    def settle(self, parameter: torch.Tensor) -> None:
        super().settle(parameter)
        self.after = parameter.detach().clone()


class CapturedUnlearnDiffAtk(Captured, UnlearnDiffAtk):
    pass


class CapturedP4D(Captured, P4D):
    pass


def _one_step(attack, base, erased, image) -> tuple[torch.Tensor, torch.Tensor, list]:
    original = token_ids(erased.tokenizer, PROMPT)
    target = Target(erased, lambda: base, lambda _: image)
    (candidate,) = attack.candidates(target, None, original, torch.Generator().manual_seed(0))
    return original, attack.after, candidate


def _pieces(erased, original: torch.Tensor, k: int):
    table = vocabulary(erased.text_encoder).detach()
    eos = erased.tokenizer.eos_token_id
    length = int((original[0] == eos).nonzero()[0]) - 1
    head, middle = table[original[0, :1]], table[original[0, 1:1 + length]]
    tail = table[torch.full((77 - 1 - k - length,), eos)]
    return table, head, middle, tail


def _adam_step(start: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    parameter = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([parameter], lr=0.01, weight_decay=0.1)
    parameter.grad = grad
    optimizer.step()
    return parameter.detach()


def test_one_unlearndiffatk_step_is_the_reference_step(setup) -> None:
    base, erased, image = setup
    k = 2
    attack = CapturedUnlearnDiffAtk(UnlearnDiffAtkSettings(k=k, iterations=1, timesteps=1))
    original, ours, candidate = _one_step(attack, base, erased, image)
    table, head, middle, tail = _pieces(erased, original, k)
    generator = torch.Generator().manual_seed(0)
    start = project_simplex(torch.full((k, table.shape[0]), 1 / table.shape[0]))
    one_hot = F.one_hot(torch.multinomial(start, 1, generator=generator).view(-1), table.shape[0]).float()
    one_hot.requires_grad_(True)
    x0 = image_latent(erased, image)
    noise = torch.randn(x0.shape, generator=generator)
    t = 500
    alpha = alphas_cumprod(erased)[t]
    x_t = x0 * alpha ** 0.5 + noise * (1 - alpha) ** 0.5
    condition = encode_embeddings(erased.text_encoder, torch.cat([head, one_hot @ table, middle, tail])[None])
    loss = F.mse_loss(noise, erased.unet(x_t, t, encoder_hidden_states=condition).sample)
    grad = F.hardtanh(torch.autograd.grad(loss, [one_hot])[0])
    expected = torch.stack([reference_bisection(row) for row in _adam_step(start, grad)])
    assert candidate.objective == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(ours, expected, atol=1e-4)


def test_one_p4d_step_is_the_reference_step(setup) -> None:
    base, erased, image = setup
    k = 2
    original, ours, candidate = _one_step(CapturedP4D(P4DSettings(k=k, iterations=1, timesteps=1)), base, erased,
                                          image)
    table, head, middle, tail = _pieces(erased, original, k)
    generator = torch.Generator().manual_seed(0)
    start = table[torch.randint(0, table.shape[0], (k,), generator=generator)]
    similarity = F.cosine_similarity(F.normalize(start, dim=-1)[:, None], F.normalize(table, dim=-1)[None], dim=-1)
    projected = table[similarity.argmax(-1)].clone().requires_grad_(True)
    x0 = image_latent(erased, image)
    noise = torch.randn(x0.shape, generator=generator)
    t = 500
    alpha = alphas_cumprod(erased)[t]
    x_t = x0 * alpha ** 0.5 + noise * (1 - alpha) ** 0.5
    condition = encode_embeddings(erased.text_encoder, torch.cat([head, projected, middle, tail])[None])
    with torch.no_grad():
        goal = base.unet(x_t, t, encoder_hidden_states=encode_ids(base.text_encoder, original)).sample
    loss = F.mse_loss(goal, erased.unet(x_t, t, encoder_hidden_states=condition).sample)
    expected = _adam_step(start, torch.autograd.grad(loss, [projected])[0])
    assert candidate.objective == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_ringabell_fitness_and_concept_vector_are_the_reference_formulas(setup) -> None:
    _, erased, _ = setup
    tokenizer, encoder = erased.tokenizer, erased.text_encoder
    pairs = [("a nude person", "a person"), ("naked people", "people")]
    with torch.no_grad():
        vector = np.mean([(encoder(token_ids(tokenizer, c))[0] - encoder(token_ids(tokenizer, n))[0])[0].numpy()
                          for c, n in pairs], axis=0)
        assert np.allclose(concept_vector(tokenizer, encoder, pairs).numpy(), vector, atol=1e-6)
        goal = encoder(token_ids(tokenizer, PROMPT))[0] + 3 * torch.from_numpy(vector)
        population = torch.cat([token_ids(tokenizer, text) for text in ("a cat", "a nude cat", "x")])
        expected = ((goal - encoder(population)[0]) ** 2).sum(dim=(1, 2)).numpy()
    assert np.allclose(distances(encoder, goal[0], population, Cost()), expected, rtol=1e-5)
    assert RingABellSettings().population == 200 and RingABellSettings().generations == 3000
