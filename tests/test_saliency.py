"""Tests for erasure.saliency: gradient accumulation, exact selection, mask files, and the training guarantee."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from erasure import saliency
from erasure.errors import MaskError
from erasure.saliency import (
    Mask,
    accumulate_gradients,
    compute_mask,
    masked_parameters,
    select_mask,
)


class Tiny(nn.Module):
    """A conv layer and a two-layer MLP."""

    def __init__(self, hidden: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(3 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def make_model(seed: int = 0, hidden: int = 10) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(hidden)


def make_batches(count: int = 4, size: int = 5, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 6, 6, generator=generator), torch.randint(0, 4, (size,), generator=generator))
        for _ in range(count)
    ]


def ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def flat(tensors: dict[str, Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in tensors.values()])


def reference_top(scores: dict[str, Tensor], ratio: float) -> np.ndarray:
    """Brute force: the int(ratio * n) largest, earliest first among equal values."""
    values = flat(scores)
    keep = np.zeros(values.size, dtype=bool)
    keep[np.argsort(-values, kind="stable")[: int(ratio * values.size)]] = True
    return keep


def abs_grads(model: nn.Module, batches: list, **kwargs) -> dict[str, Tensor]:
    summed = accumulate_gradients(model, batches, ce_loss, progress=False, **kwargs)
    return {n: g.abs() for n, g in summed.grads.items()}


# ---------------------------------------------------------------------------- accumulation


def test_accumulated_gradient_is_the_signed_sum_and_leaves_grad_fields_alone() -> None:
    model, batches = make_model(), make_batches()
    summed = accumulate_gradients(model, batches, ce_loss, progress=False)
    assert all(p.grad is None for p in model.parameters())
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        ce_loss(model, batch).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    assert list(summed.grads) == [n for n, _ in model.named_parameters()]
    for n, g in summed.grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, expected[n])
    assert (summed.samples, summed.batches) == (20, 4)


def test_grad_clip_sums_per_batch_clipped_gradients() -> None:
    model, batches = make_model(), make_batches()
    clip = 0.05
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        ce_loss(model, batch).backward()
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), clip) > clip  # clipping is active
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad(set_to_none=True)
    summed = accumulate_gradients(model, batches, ce_loss, grad_clip=clip, progress=False)
    for n, g in summed.grads.items():
        torch.testing.assert_close(g, expected[n])


@pytest.mark.parametrize(
    ("batch", "samples"),
    [
        (torch.zeros(7, 3), 7),
        ((torch.zeros(3, 2), torch.zeros(3)), 3),
        ({"ids": [1, 2], "pixels": torch.zeros(2, 5)}, 2),
        ({"prompts": ["a", "b", "c"]}, 3),
        (["a photo of a cat", "a dog"], 2),
        (object(), 1),
    ],
)
def test_forget_samples_are_counted(batch: object, samples: int) -> None:
    def weight_sum(model: nn.Module, _: object) -> Tensor:
        return model.weight.sum()

    mask = compute_mask(nn.Linear(2, 1), [batch, batch], weight_sum, ratio=0.5, progress=False)
    assert mask.metadata["forget_samples"] == 2 * samples
    assert mask.metadata["forget_batches"] == 2


def test_model_mode_is_left_as_set_and_progress_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model().eval()
    compute_mask(model, make_batches(), ce_loss, ratio=0.5)
    assert not model.training
    assert "saliency" in capsys.readouterr().err


def test_wrapped_model_is_unwrapped() -> None:
    mask = compute_mask(nn.DataParallel(make_model()), make_batches(), ce_loss, ratio=0.5, progress=False)
    assert next(iter(mask)) == "conv.weight" and mask.metadata["model_class"] == "Tiny"


def test_low_precision_parameters_get_float32_sums_and_the_guarantee() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    batches = [(torch.randn(4, 6, dtype=torch.bfloat16), torch.randint(0, 3, (4,))) for _ in range(3)]
    summed = accumulate_gradients(model, batches, ce_loss, progress=False)
    assert all(g.dtype == torch.float32 for g in summed.grads.values())
    mask = compute_mask(model, batches, ce_loss, ratio=0.5, progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    mask.protect_unmasked(model, optimizer)
    for batch in batches * 3:
        optimizer.zero_grad()
        ce_loss(model, batch).backward()
        mask.apply_to_grads(model)
        optimizer.step()
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach()[~mask[n]], start[n][~mask[n]])
        assert not torch.equal(p.detach()[mask[n]], start[n][mask[n]])


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.9])
def test_ratio_mask_equals_brute_force_top_k(ratio: float) -> None:
    model, batches = make_model(), make_batches()
    mask = compute_mask(model, batches, ce_loss, ratio=ratio, progress=False, loss_name="ce")
    scores = abs_grads(model, batches)
    assert np.array_equal(flat(mask.masks), reference_top(scores, ratio))
    numel = sum(p.numel() for p in model.parameters())
    meta = mask.metadata
    assert meta["mode"] == "ratio" and meta["ratio"] == ratio and meta["threshold"] is None
    assert meta["kept"] == int(ratio * numel) and meta["numel"] == numel
    assert meta["density"] == pytest.approx(mask.density) == pytest.approx(int(ratio * numel) / numel)
    assert meta["threshold_used"] == np.sort(flat(scores))[::-1][meta["kept"] - 1]
    assert meta | {"ratio": 0, "threshold_used": 0, "density": 0, "kept": 0} == {
        "mode": "ratio", "ratio": 0, "threshold": None, "threshold_used": 0, "density": 0, "kept": 0,
        "numel": numel, "loss_name": "ce", "forget_samples": 20, "forget_batches": 4, "param_filter": None,
        "grad_clip": None, "model_class": "Tiny", "world_size": 1, "sharded": False,
    }


def test_threshold_mask_equals_numpy() -> None:
    model, batches = make_model(), make_batches()
    scores = abs_grads(model, batches)
    cut = float(np.median(flat(scores)))
    mask = compute_mask(model, batches, ce_loss, threshold=cut, progress=False)
    assert np.array_equal(flat(mask.masks), flat(scores) >= np.float32(cut))
    assert mask.metadata["mode"] == "threshold" and mask.metadata["threshold_used"] == cut


def test_ties_keep_the_earliest_entries() -> None:
    scores = {
        "a": torch.tensor([5.0, 1.0, 1.0, 0.5, 1.0]),
        "b": torch.tensor([[1.0, 7.0], [1.0, 1.0]]),
        "c": torch.tensor([1.0, 1.0, 2.0]),
    }
    masks, cut = select_mask(scores, ratio=0.5)  # n = 12, k = 6: 7, 5, 2 and the first three 1.0s
    assert cut == 1.0
    assert masks["a"].tolist() == [True, True, True, False, True]
    assert masks["b"].tolist() == [[False, True], [False, False]]
    assert masks["c"].tolist() == [False, False, True]


def test_all_zero_gradients_keep_exactly_the_first_half() -> None:
    def zero_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return 0.0 * ce_loss(model, batch)

    mask = compute_mask(make_model(), make_batches(), zero_loss, ratio=0.5, progress=False)
    kept = flat(mask.masks)
    assert kept.sum() == int(0.5 * kept.size)
    assert kept[: kept.sum()].all() and not kept[kept.sum() :].any()
    assert mask.metadata["threshold_used"] == 0.0


def bucket_straddling_scores() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    return {
        "tiny": rand(301) * 1e-30,
        "subnormal": rand(17, 3) * 1e-40,
        "zeros": torch.zeros(40),
        "huge": rand(11) * 1e30,
        "unit": rand(7, 13),
        "repeats": torch.tensor([0.25, 0.5, 0.25, 1e-30, 0.0] * 9),
        "scalar": torch.tensor(3.0),
    }


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99])
def test_select_is_exact_across_float_bit_buckets(ratio: float) -> None:
    scores = bucket_straddling_scores()
    masks, cut = select_mask(scores, ratio=ratio)
    assert np.array_equal(flat(masks), reference_top(scores, ratio))
    values = flat(scores)
    assert cut == np.sort(values)[::-1][int(ratio * values.size) - 1]
    assert all(masks[n].shape == s.shape and masks[n].dtype == torch.bool for n, s in scores.items())


@pytest.mark.parametrize("chunk", [7, 100])
def test_select_is_exact_with_small_packed_blocks(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(saliency, "_CHUNK", chunk)
    scores = bucket_straddling_scores()
    for ratio in (0.1, 0.5, 0.9):
        masks, _ = select_mask(scores, ratio=ratio)
        assert np.array_equal(flat(masks), reference_top(scores, ratio))


@pytest.mark.parametrize("threshold", [0.0, 1e-41, 1e-30, 0.25, 1e29])
def test_select_threshold_is_exact(threshold: float) -> None:
    scores = bucket_straddling_scores()
    masks, cut = select_mask(scores, threshold=threshold)
    assert np.array_equal(flat(masks), flat(scores) >= np.float32(threshold))
    assert cut == threshold


def test_select_handles_non_contiguous_scores() -> None:
    base = torch.rand(6, 9, generator=torch.Generator().manual_seed(4))
    masks, _ = select_mask({"t": base.t()}, ratio=0.3)
    assert np.array_equal(masks["t"].numpy().ravel(), reference_top({"t": base.t().contiguous()}, 0.3))


def test_parameter_filters() -> None:
    model, batches = make_model(), make_batches()
    by_regex = compute_mask(model, batches, ce_loss, ratio=0.5, params=r"^fc\d\.weight$", progress=False)
    assert list(by_regex) == ["fc1.weight", "fc2.weight"]
    assert by_regex.metadata["param_filter"] == r"^fc\d\.weight$"
    conv = lambda name: name.startswith("conv")  # noqa: E731
    by_callable = compute_mask(model, batches, ce_loss, ratio=0.5, params=conv, progress=False)
    assert list(by_callable) == ["conv.weight", "conv.bias"]
    assert by_callable.metadata["param_filter"].startswith("callable:")
    model.fc2.requires_grad_(False)
    assert "fc2.weight" not in compute_mask(model, batches, ce_loss, ratio=0.5, progress=False)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ratio": 0.0}, ["ratio must be in (0, 1)", "threshold=", "no mask"]),
        ({"ratio": 1.0}, ["ratio must be in (0, 1)", "threshold=", "no mask"]),
        ({"ratio": 1.5}, ["ratio must be in (0, 1)", "threshold=", "no mask"]),
        ({"ratio": -0.2}, ["ratio must be in (0, 1)"]),
        ({"ratio": 0.5, "threshold": 0.1}, ["exactly one", "ratio", "threshold"]),
        ({}, ["exactly one", "ratio", "threshold"]),
        ({"threshold": -1.0}, ["threshold must be >= 0"]),
        ({"ratio": 0.5, "grad_clip": 0.0}, ["grad_clip must be > 0"]),
        ({"ratio": 0.5, "params": "^nothing$"}, ["no trainable parameter", "^nothing$", "named_parameters"]),
        ({"ratio": 0.5, "params": "fc("}, ["not a valid regular expression", "fc("]),
    ],
)
def test_bad_arguments_raise_helpful_errors(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(MaskError) as info:
        compute_mask(make_model(), make_batches(), ce_loss, progress=False, **kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_empty_forget_set_is_refused() -> None:
    with pytest.raises(MaskError, match=r"forget set is empty.*non-empty"):
        compute_mask(make_model(), [], ce_loss, ratio=0.5, progress=False)


def test_non_finite_gradient_is_refused() -> None:
    def nan_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return ce_loss(model, batch) * float("nan")

    with pytest.raises(MaskError, match=r"NaN or inf.*non-finite"):
        compute_mask(make_model(), make_batches(), nan_loss, ratio=0.5, progress=False)
    with pytest.raises(MaskError, match="NaN or inf"):
        compute_mask(make_model(), make_batches(), nan_loss, threshold=0.1, progress=False)


def test_bad_losses_are_refused() -> None:
    with pytest.raises(MaskError, match="scalar"):
        compute_mask(make_model(), make_batches(), lambda m, b: m(b[0]), ratio=0.5, progress=False)
    with pytest.raises(MaskError, match="does not depend"):
        compute_mask(make_model(), make_batches(), lambda m, b: torch.tensor(1.0), ratio=0.5, progress=False)


def test_select_refuses_bad_scores() -> None:
    with pytest.raises(MaskError, match="non-negative"):
        select_mask({"a": torch.tensor([1.0, -2.0])}, ratio=0.5)
    with pytest.raises(MaskError, match=r"float32.*\.float\(\)"):
        select_mask({"a": torch.ones(4, dtype=torch.float64)}, ratio=0.5)
    with pytest.raises(MaskError, match="NaN or inf"):
        select_mask({"a": torch.tensor([1.0, float("inf")])}, ratio=0.5)
    with pytest.raises(MaskError, match=r"keeps no entry.*raise the ratio"):
        select_mask({"a": torch.ones(3)}, ratio=0.1)
    with pytest.raises(MaskError, match="no scores"):
        select_mask({}, ratio=0.5)


def test_mask_requires_bool_tensors() -> None:
    with pytest.raises(MaskError, match=r"torch.bool.*\['w'\].*\.bool\(\)"):
        Mask({"w": torch.ones(3)})


# ---------------------------------------------------------------------------- files


def odd_mask() -> Mask:
    generator = torch.Generator().manual_seed(5)
    masks = {
        "a.weight": torch.rand(3, 5, generator=generator) > 0.5,
        "b": torch.rand(13, generator=generator) > 0.3,
        "c": torch.tensor(True),
        "d": torch.rand(2, 3, 7, generator=generator) > 0.7,
    }
    return Mask(masks, {"mode": "ratio", "ratio": 0.5, "nested": {"x": [1, 2.5, None]}})


@pytest.mark.parametrize("packed", [False, True])
def test_save_load_round_trip(tmp_path, packed: bool) -> None:
    mask, path = odd_mask(), tmp_path / "mask.safetensors"
    mask.save(path, packed=packed)
    loaded = Mask.load(path)
    assert list(loaded) == list(mask) and loaded.metadata == mask.metadata
    assert all(torch.equal(loaded[n], mask[n]) and loaded[n].dtype == torch.bool for n in mask)
    assert os.listdir(tmp_path) == ["mask.safetensors"]  # the temporary file was renamed away
    plain = load_file(path)
    expected_dtype = torch.uint8 if packed else torch.bool
    assert all(t.dtype == expected_dtype for t in plain.values())
    if packed:
        bits = np.packbits(mask["b"].numpy(), bitorder="little")
        assert np.array_equal(plain["b"].numpy(), bits)


def test_save_header_format(tmp_path) -> None:
    from safetensors import safe_open

    path = tmp_path / "sub" / "m.safetensors"
    odd_mask().save(path, packed=True)
    with safe_open(path, framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "erasure-mask/v1" and header["packing"] == "bits-le"
    assert json.loads(header["erasure.mask"])["ratio"] == 0.5


def test_load_missing_or_foreign_file(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MaskError, match=f"{missing}.*does not exist"):
        Mask.load(missing)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MaskError, match="not a readable safetensors"):
        Mask.load(tmp_path / "junk.safetensors")


def test_unserialisable_metadata_is_refused(tmp_path) -> None:
    with pytest.raises(MaskError, match="JSON"):
        Mask({"w": torch.ones(2, dtype=torch.bool)}, {"bad": object()}).save(tmp_path / "m.safetensors")


def test_load_with_model_checks_fit(tmp_path) -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.5, progress=False)
    path = tmp_path / "m.safetensors"
    mask.save(path)
    assert list(Mask.load(path, model)) == list(mask)

    with pytest.raises(MaskError) as info:
        Mask.load(path, make_model(hidden=12))
    message = str(info.value)
    assert "fc1.weight has shape (10, 48) in the mask but (12, 48) in the model" in message
    assert "fc1.bias" in message and "fc2.weight" in message and "3 problems" in message

    extra = Mask(mask.masks | {"head.weight": torch.ones(2, dtype=torch.bool)}, mask.metadata)
    with pytest.raises(MaskError, match=r"head\.weight is not a parameter"):
        extra.validate(model)

    Mask({"fc2.bias": mask["fc2.bias"]}).validate(model)  # parameters missing from the mask are frozen


def test_mask_for_another_model_says_so() -> None:
    mask = compute_mask(make_model(), make_batches(), ce_loss, ratio=0.5, progress=False)
    with pytest.raises(MaskError, match=r"another model.*Tiny.*recompute"):
        mask.validate(nn.Sequential(nn.Linear(3, 3)))


# ---------------------------------------------------------------------------- training with a mask


def train(model: nn.Module, mask: Mask, optimizer: torch.optim.Optimizer, steps: int = 50) -> None:
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        ce_loss(model, (x, y)).backward()
        mask.apply_to_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_protect_unmasked_keeps_unmasked_weights_bit_identical(name: str) -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.5, params="fc", progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OPTIMIZERS[name](model.parameters())  # conv.* is in the optimizer but not in the mask
    mask.protect_unmasked(model, optimizer)
    train(model, mask, optimizer)
    for n, p in model.named_parameters():
        keep = mask[n] if n in mask else torch.zeros_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[~keep], start[n][~keep]), n
        if keep.any():
            moved = (p.detach()[keep] != start[n][keep]).float().mean()
            assert moved > 0.5, (n, moved)


def test_without_protection_weight_decay_moves_unmasked_weights() -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.5, progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, mask, OPTIMIZERS["adamw"](model.parameters()), steps=5)
    frozen = {n: ~m for n, m in mask.masks.items() if not m.all()}
    assert len(frozen) >= 3
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n].detach()[f], start[n][f]) for n, f in frozen.items())


def test_protection_handle_removes_the_hook() -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.5, progress=False)
    optimizer = OPTIMIZERS["adamw"](masked_parameters(model, mask))
    mask.protect_unmasked(model, optimizer).remove()
    before = model.fc1.weight.detach().clone()
    train(model, mask, optimizer, steps=2)
    assert not torch.equal(model.fc1.weight.detach()[~mask["fc1.weight"]], before[~mask["fc1.weight"]])


def test_protect_refuses_an_optimizer_of_another_model() -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.5, progress=False)
    with pytest.raises(MaskError, match="not in Tiny"):
        mask.protect_unmasked(model, torch.optim.SGD(make_model().parameters(), lr=0.1))


def test_apply_to_grads_zeroes_exactly_the_unmasked_entries() -> None:
    model = make_model()
    mask = compute_mask(model, make_batches(), ce_loss, ratio=0.4, params="fc1|conv.weight", progress=False)
    ce_loss(model, make_batches(1, seed=7)[0]).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    mask.apply_to_grads(model)
    for n, p in model.named_parameters():
        keep = mask[n] if n in mask else torch.zeros_like(p, dtype=torch.bool)
        assert torch.equal(p.grad, torch.where(keep, before[n], torch.zeros_like(p))), n


def test_apply_to_grads_refuses_a_shape_mismatch() -> None:
    mask = compute_mask(make_model(), make_batches(), ce_loss, ratio=0.5, progress=False)
    other = make_model(hidden=12)
    ce_loss(other, make_batches(1)[0]).backward()
    with pytest.raises(MaskError, match=r"fc1.weight has shape \(10, 48\).*\(12, 48\)"):
        mask.apply_to_grads(other)


def test_masked_parameters_and_stats() -> None:
    model = make_model()
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["fc1.weight"][0, :3] = True
    masks["conv.bias"][:] = True
    mask = Mask(masks)
    assert masked_parameters(model, mask) == [model.conv.bias, model.fc1.weight]
    rows = {row["name"]: row for row in mask.stats()}
    assert rows["fc1.weight"] == {"name": "fc1.weight", "shape": [10, 48], "numel": 480, "kept": 3, "density": 3 / 480}
    assert rows["conv.bias"]["density"] == 1.0
    total = sum(p.numel() for p in model.parameters())
    assert mask.summary() == {"tensors": 6, "numel": total, "kept": 6, "density": 6 / total}
    assert mask.density == 6 / total and len(mask) == 6 and "conv.bias" in mask


# ---------------------------------------------------------------------------- soft masks


def test_soft_mask_tends_to_the_hard_mask_as_the_temperature_falls() -> None:
    model, batches = make_model(), make_batches()
    hard = compute_mask(model, batches, ce_loss, ratio=0.3, progress=False)
    cut = hard.metadata["threshold_used"]
    scores = abs_grads(model, batches)
    untied = {n: s != cut for n, s in scores.items()}
    for temperature in (1.0, 1e-3, 1e-6):
        soft = compute_mask(model, batches, ce_loss, ratio=0.3, progress=False, soft_temperature=temperature)
        assert soft.is_soft and soft.metadata["soft_temperature"] == temperature
        assert all(((m >= 0) & (m <= 1)).all() for m in soft.masks.values())
        gap = max(float((soft[n] - hard[n].float())[untied[n]].abs().max()) for n in soft)
    assert gap < 1e-3
    coarse = compute_mask(model, batches, ce_loss, ratio=0.3, progress=False, soft_temperature=1.0)
    assert 0 < coarse.density < 1 and coarse.summary()["kept"] == coarse.summary()["numel"]


def test_a_soft_mask_scales_gradients_saves_as_floats_and_freezes_only_zero_weights(tmp_path) -> None:
    model = make_model()
    weights = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    weights["fc2.weight"][0] = 0.0
    mask = Mask(weights, {"kind": "test"}, soft=True)
    mask.save(tmp_path / "soft.safetensors")
    loaded = Mask.load(tmp_path / "soft.safetensors", model)
    assert loaded.is_soft and all(torch.equal(loaded[n], weights[n]) for n in weights)
    assert loaded.density == pytest.approx(float(torch.cat([w.flatten() for w in weights.values()]).mean()))
    with pytest.raises(MaskError, match="cannot be bit-packed"):
        mask.save(tmp_path / "packed.safetensors", packed=True)
    ce_loss(model, make_batches(1)[0]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loaded.apply_to_grads(model)
    assert all(torch.allclose(p.grad, grads[n] * weights[n]) for n, p in model.named_parameters())
    frozen, moving = model.fc2.weight.detach()[0].clone(), model.fc2.weight.detach()[1].clone()
    optimizer = torch.optim.AdamW(masked_parameters(model, loaded), lr=0.1, weight_decay=0.1)
    loaded.protect_unmasked(model, optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        ce_loss(model, make_batches(1)[0]).backward()
        loaded.apply_to_grads(model)
        optimizer.step()
    assert torch.equal(model.fc2.weight.detach()[0], frozen)
    assert not torch.equal(model.fc2.weight.detach()[1], moving)


def test_soft_masks_refuse_weights_outside_the_unit_interval() -> None:
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        Mask({"w": torch.tensor([0.5, 1.5])}, soft=True)
    with pytest.raises(MaskError, match="temperature must be > 0"):
        saliency.soft_mask({"w": torch.rand(4)}, temperature=0.0, ratio=0.5)
