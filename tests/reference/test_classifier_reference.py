"""Conformance: each classifier method's step against a plain-torch statement of its reference.

The references are OPTML-Group/Unlearn-Saliency at a6e89fd, `Classification/unlearn/`: FT.py (ft, l1_sparse:
CE + alpha (1 - epoch / epochs) ||theta||_1), GA.py (-CE on forget), RL.py (each epoch a forget pass with labels
drawn from all classes, then a retain pass; masked: grad *= mask, step, then the unmasked weights restored),
impl.py (SGD, momentum 0.9, weight decay 5e-4, constant rate) and the mask (Classification/generate_mask.py:
|sum over forget batches of the CE gradient| in eval mode, top int(n * ratio) by rank). Our loop draws the batches
(`Loop.batch(step)`, a pure function of the seed and the step); the reference update is replayed on those same
batches in plain torch and the weights compared after several steps.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from classifiers.config import UnlearnConfig
from classifiers.loop import Loop, Streams
from classifiers.methods import build_method, image_batches
from classifiers.models import to_input
from erasure.config import from_dict
from erasure.datasets import ImageSet
from erasure.io import RunDir
from erasure.saliency import compute_mask

CLASSES = 4


def _data() -> tuple[ImageSet, ImageSet]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 2, 2), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % CLASSES
    forget = labels == 1
    return ImageSet(images[forget], labels[forget]), ImageSet(images[~forget], labels[~forget])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, CLASSES))


def _config(method: str, shared: dict | None = None, **settings: object) -> UnlearnConfig:
    """The config of `method` with the reference optimizer and the method's own `settings` (its section)."""
    data = {"original": "unused", "method": method, "epochs": 2, "batch_size": 4, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 5e-4, "checkpoint_every": 0, **(shared or {})}
    if settings:
        data[method] = settings
    return from_dict(UnlearnConfig, data)


def _run_ours(tmp_path: Path, config: UnlearnConfig, mask=None) -> tuple[torch.nn.Module, Loop]:
    forget, retain = _data()
    model = _model()
    method = build_method(config)
    loop = Loop(model, method, Streams(forget, retain), method.optim_config(config),
                RunDir(tmp_path / "run"), num_classes=CLASSES, augment_images=False,
                accelerator=Accelerator(cpu=True), mask=mask, forget_batch_size=config.forget_batch_size)
    loop.run_steps()
    return loop.unwrapped, loop


def _replay(loop: Loop, loss_of, mask=None) -> torch.nn.Module:
    """The reference's SGD loop over our batches (`loss_of(model, batch, step)`):
    loss -> backward -> (grad *= mask) -> step -> (restore the unmasked weights, mask the momentum)."""
    model = _model()
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=loop.config.lr, momentum=0.9, weight_decay=5e-4)
    for step in range(loop.total_steps):
        optimizer.zero_grad()
        loss_of(model, loop.batch(step), step).backward()
        if mask is not None:
            for name, p in model.named_parameters():
                p.grad *= mask[name]
        optimizer.step()
        if mask is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(torch.where(mask[name], p, theta0[name]))
                    optimizer.state[p]["momentum_buffer"].mul_(mask[name])
    return model


def _assert_same(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=False):
        torch.testing.assert_close(a, b, msg=name)


def _random_label_loss(model, batch, step):
    if batch.forget is not None:
        return F.cross_entropy(model(batch.forget[0]), batch.forget_random_labels)
    return F.cross_entropy(model(batch.retain[0]), batch.retain[1])


def test_ft_is_cross_entropy_on_retain(tmp_path: Path) -> None:
    ours, loop = _run_ours(tmp_path, _config("ft"))
    _assert_same(ours, _replay(loop, lambda m, b, s: F.cross_entropy(m(b.retain[0]), b.retain[1])))


def test_ga_is_negated_cross_entropy_on_forget(tmp_path: Path) -> None:
    ours, loop = _run_ours(tmp_path, _config("ga", {"lr": 0.01}))
    _assert_same(ours, _replay(loop, lambda m, b, s: -F.cross_entropy(m(b.forget[0]), b.forget[1])))


def test_l1_sparse_decays_the_penalty_by_epoch(tmp_path: Path) -> None:
    config = _config("l1_sparse", alpha=0.01)
    ours, loop = _run_ours(tmp_path, config)

    def loss(model, batch, step):
        epoch = step // loop.steps_per_epoch
        alpha = 0.01 * (1 - epoch / config.epochs)
        l1 = torch.linalg.norm(torch.cat([p.view(-1) for p in model.parameters()]), ord=1)
        return F.cross_entropy(model(batch.retain[0]), batch.retain[1]) + alpha * l1

    _assert_same(ours, _replay(loop, loss))


def test_rl_is_a_forget_pass_with_labels_from_all_classes_then_a_retain_pass(tmp_path: Path) -> None:
    ours, loop = _run_ours(tmp_path, _config("rl"))
    forget, retain = _data()
    per_epoch = -(-len(forget) // 4) + -(-len(retain) // 4)
    assert loop.steps_per_epoch == per_epoch
    plan = [loop.batch(s).forget is not None for s in range(per_epoch)]
    assert plan == [True] * -(-len(forget) // 4) + [False] * -(-len(retain) // 4)
    drawn = torch.cat([loop.batch(s).forget_random_labels for s in range(loop.total_steps)
                       if loop.batch(s).forget is not None])
    assert set(drawn.tolist()) == set(range(CLASSES)), "labels come from all classes, the true one included"
    _assert_same(ours, _replay(loop, _random_label_loss))


def test_salun_masks_the_reference_gradient_and_restores_the_rest(tmp_path: Path) -> None:
    config = _config("salun", mask_ratio=0.5)
    forget, _ = _data()
    model = _model()
    model.eval()
    ours_mask = compute_mask(model, image_batches(forget, 4), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                             ratio=0.5, progress=False)
    summed = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in image_batches(forget, 4):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            summed[name] += p.grad
    scores = -torch.cat([g.abs().flatten() for g in summed.values()])
    keep = torch.argsort(torch.argsort(scores, stable=True), stable=True) < int(len(scores) * 0.5)
    assert torch.equal(torch.cat([ours_mask.masks[n].flatten() for n in summed]), keep)

    ours, loop = _run_ours(tmp_path, config, mask=ours_mask)
    _assert_same(ours, _replay(loop, _random_label_loss, mask=ours_mask.masks))


def test_rl_joint_variant_adds_a_wrong_label_forget_batch_to_each_retain_batch(tmp_path: Path) -> None:
    ours, loop = _run_ours(tmp_path, _config("rl", plan="joint"))
    batch = loop.batch(0)
    assert batch.forget is not None and batch.retain is not None
    assert not torch.any(batch.forget_random_labels == batch.forget[1])

    def loss(model, b, step):
        return (F.cross_entropy(model(b.forget[0]), b.forget_random_labels)
                + F.cross_entropy(model(b.retain[0]), b.retain[1]))

    _assert_same(ours, _replay(loop, loss))


@pytest.mark.parametrize("damping", [0.1, 1.0])
def test_iu_solves_the_damped_empirical_fisher_exactly(damping: float) -> None:
    """Ours: (damping I + G^T G / N)^-1 v exactly (Woodbury). The reference's Wfisher.py recursion moves the
    weights along v and the first sample's gradient only; our iu_alpha is therefore not the reference's."""
    from classifiers.methods import woodfisher_solve

    generator = torch.Generator().manual_seed(0)
    per_sample = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    v = torch.randn(20, generator=generator, dtype=torch.float64)
    fisher = damping * torch.eye(20, dtype=torch.float64) + per_sample.T @ per_sample / 6
    torch.testing.assert_close(woodfisher_solve(per_sample, v, damping), torch.linalg.solve(fisher, v))


def test_ssd_dampens_exactly_the_weights_its_rule_selects() -> None:
    """SSD (Foster et al. 2024, github.com/if-loops/selective-synaptic-dampening): weights with forget importance
    > alpha x full importance are multiplied by min(lambda x full / forget, 1); the rest are untouched."""
    from classifiers import fisher

    forget, retain = _data()
    model = _model()
    before = copy.deepcopy(model)
    everything = ImageSet(torch.cat([forget.images, retain.images]), torch.cat([forget.labels, retain.labels]))
    on_forget = fisher.fisher_diagonal(model, image_batches(forget, 4))
    on_all = fisher.fisher_diagonal(model, image_batches(everything, 4))
    fisher.dampen(model, on_forget, on_all, alpha=1.5, strength=1.0)
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=False):
        selected = on_forget[name] > 1.5 * on_all[name]
        factor = torch.where(selected, torch.clamp(1.0 * on_all[name] / on_forget[name], max=1.0),
                             torch.ones_like(p))
        torch.testing.assert_close(p, q * factor, msg=name)
        assert torch.equal(p[~selected], q[~selected])


def test_kaggle_1st_is_kl_to_uniform_then_contrast_plus_retain_cross_entropy() -> None:
    """The challenge winner's write-up: first push forget outputs to the uniform distribution, then contrast
    forget against retain outputs (temperature T) with the retain cross-entropy."""
    from classifiers.methods import StepBatch

    forget, retain = _data()
    config = _config("kaggle_1st", kl_epochs=1.0, temperature=1.15)
    method, model = build_method(config), _model()
    x_f, x_r, y_r = to_input(forget.images[:4]), to_input(retain.images[:4]), retain.labels[:4]
    kl_phase = method.loss(model, StepBatch((x_f, forget.labels[:4]), None, (x_r, y_r), progress=0.1))
    log_p = F.log_softmax(model(x_f), dim=1)
    uniform = torch.full_like(log_p, 1 / CLASSES)
    torch.testing.assert_close(kl_phase, (uniform * (uniform.log() - log_p)).sum(dim=1).mean())
    contrast_phase = method.loss(model, StepBatch((x_f, forget.labels[:4]), None, (x_r, y_r), progress=0.9))
    similarity = F.normalize(model(x_f), dim=1) @ F.normalize(model(x_r), dim=1).T / 1.15
    expected = -F.log_softmax(similarity, dim=1).mean() + F.cross_entropy(model(x_r), y_r)
    torch.testing.assert_close(contrast_phase, expected)


def test_kaggle_2nd_reinitialises_the_least_salient_layer_weights_and_slows_the_rest() -> None:
    """The runner-up's write-up: re-initialise the share r of conv/linear weights with the smallest |forget
    gradient|, then fine-tune with the other gradients scaled by a factor (a soft mask)."""
    forget, retain = _data()
    config = _config("kaggle_2nd", reinit_ratio=0.3, grad_scale=0.1)
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = build_method(config).edit(model, forget, retain)
    model_ref = _model()
    model_ref.eval()
    summed = {n: torch.zeros_like(p) for n, p in model_ref.named_parameters() if p.dim() > 1}
    for x, y in image_batches(forget, config.batch_size):
        grads = torch.autograd.grad(F.cross_entropy(model_ref(x), y), [p for n, p in model_ref.named_parameters()
                                                                      if n in summed])
        for name, g in zip(summed, grads, strict=False):
            summed[name] += g
    scores = torch.cat([g.abs().flatten() for g in summed.values()])
    kept = torch.argsort(torch.argsort(-scores, stable=True), stable=True) < int(len(scores) * 0.7)
    offset = 0
    for name, p in model.named_parameters():
        if name not in summed:
            assert torch.equal(p, before[name]) and torch.all(mask.masks[name] == 0.1), name
            continue
        fresh = ~kept[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        assert torch.equal(p[~fresh], before[name][~fresh]), name
        assert not torch.any(p[fresh] == before[name][fresh]), name
        assert torch.equal(mask.masks[name], torch.where(fresh, 1.0, 0.1)), name


def test_piggyback_shrink_scales_exactly_the_selected_weights() -> None:
    from classifiers.piggyback import shrink
    from erasure.saliency import Mask

    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    selected = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3
                for name, p in model.named_parameters()}
    with torch.no_grad():
        shrink(model, Mask(selected), 0.1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, torch.where(selected[name], before[name] * 0.1, before[name]))
        assert torch.equal(p[~selected[name]], before[name][~selected[name]])
