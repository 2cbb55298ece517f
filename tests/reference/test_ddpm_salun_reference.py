"""Conformance: the DDPM SalUn objective and mask against a plain-torch re-statement of the reference.

The reference is OPTML-Group/Unlearn-Saliency at a6e89fd: `DDPM/functions/losses.py`
(`noise_estimation_loss_conditional`: squared error summed over channels and pixels, mean over the batch),
`DDPM/runners/diffusion.py` `saliency_unlearn` (loss = MSELoss(pseudo, out) + alpha * remain_loss; clip the whole
gradient to norm 1, then multiply by the mask) and `generate_mask` (eval mode, guided prediction with
cond_scale w: (1 + w) eps(c) - w eps(null), summed loss, each batch clipped to norm 1, |sum|, top 50 % by rank).
Timesteps and noise are drawn from the same seeded generators as ours, so the two computations see equal inputs.
"""
from __future__ import annotations

import torch

from erasure.datasets import ImageSet
from erasure.streams import stream_generator
from pipelines import ddpm_commands as commands
from pipelines.ddpm import NULL_CLASS, build_scheduler, build_unet, take
from pipelines.ddpm_config import DDPMUnlearnConfig

SIZE, BATCH = 8, 6


def _setup(**settings: object) -> tuple[torch.nn.Module, object, DDPMUnlearnConfig, ImageSet]:
    torch.manual_seed(0)
    unet, scheduler = build_unet("tiny", SIZE), build_scheduler()
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3 * BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    forget = ImageSet(images, torch.zeros(3 * BATCH, dtype=torch.long))
    config = DDPMUnlearnConfig(run="unused", forget="airplane", forget_batch_size=BATCH, **settings)
    config.validate()  # fills salun's default mask ratio (0.5), as loading a config does
    return unet, scheduler, config, forget


def _reference_noised(scheduler, x0: torch.Tensor, generator: torch.Generator, antithetic: bool):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e with the reference's timestep draw (antithetic pairs)."""
    n, steps = x0.shape[0], scheduler.config.num_train_timesteps
    if antithetic:
        half = torch.randint(0, steps, (n // 2 + 1,), generator=generator)
        t = torch.cat([half, steps - half - 1])[:n]
    else:
        t = torch.randint(0, steps, (n,), generator=generator)
    e = torch.randn(x0.shape, generator=generator)
    a = scheduler.alphas_cumprod.index_select(0, t).view(-1, 1, 1, 1)
    return x0 * a.sqrt() + e * (1.0 - a).sqrt(), t, e


def test_the_retain_term_is_the_reference_loss_summed_per_image() -> None:
    unet, scheduler, config, forget = _setup(label_dropout=0.0)
    x0, labels = take(forget, BATCH, 0, 0, 1, flip=False)
    ours = commands.retain_objective(config, scheduler)(unet, (x0, labels, 7))
    x_t, t, e = _reference_noised(scheduler, x0, stream_generator(config.seed, commands.RETAIN_STREAM, 7), True)
    reference = (e - unet(x_t, t, class_labels=labels).sample).square().sum(dim=(1, 2, 3)).mean(dim=0)
    torch.testing.assert_close(ours, reference)
    # alpha is in the reference's units: the summed term is 3 * H * W times the mean squared error
    mean_mse = (e - unet(x_t, t, class_labels=labels).sample).square().mean()
    torch.testing.assert_close(ours, mean_mse * 3 * SIZE * SIZE)


def test_the_remap_term_is_a_mean_mse_against_the_detached_remap_prediction() -> None:
    unet, scheduler, config, forget = _setup(label_dropout=0.0)
    x0, labels = take(forget, BATCH, 0, 0, 1, flip=False)
    ours = commands.forget_objective(config, scheduler)(unet, (x0, labels, 3))
    x_t, t, _ = _reference_noised(scheduler, x0, stream_generator(config.seed, commands.NOISE_STREAM, 3), True)
    pseudo = unet(x_t, t, class_labels=torch.full_like(labels, config.remap_class)).sample.detach()
    reference = torch.nn.MSELoss()(pseudo, unet(x_t, t, class_labels=labels).sample)
    torch.testing.assert_close(ours, reference)


def test_the_mask_is_the_reference_guided_summed_clipped_top_half() -> None:
    unet, scheduler, config, forget = _setup()
    ours = commands._saliency_mask(config, unet, forget, scheduler, accelerator=None)
    unet.eval()
    summed = {name: torch.zeros_like(p) for name, p in unet.named_parameters()}
    for index in range(len(forget) // BATCH):
        x0, labels = take(forget, BATCH, index, config.seed, commands.MASK_STREAM, flip=False)
        generator = stream_generator(config.seed, commands.MASK_STREAM, index)
        x_t, t, e = _reference_noised(scheduler, x0, generator, True)
        w = config.mask_guidance
        guided = ((1 + w) * unet(x_t, t, class_labels=labels).sample
                  - w * unet(x_t, t, class_labels=torch.full_like(labels, NULL_CLASS)).sample)
        unet.zero_grad()
        (e - guided).square().sum(dim=(1, 2, 3)).mean(dim=0).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for name, p in unet.named_parameters():
            if p.grad is not None:
                summed[name] += p.grad
    scores = -torch.cat([g.abs().flatten() for g in summed.values()])
    ranks = torch.argsort(torch.argsort(scores, stable=True), stable=True)
    keep = ranks < int(len(scores) * config.mask_ratio)
    ours_flat = torch.cat([ours.masks[name].flatten().bool() for name in summed])
    assert torch.equal(ours_flat, keep)


def test_the_update_clips_the_whole_gradient_before_masking() -> None:
    """One masked step in the reference order equals ours: clip_grad_norm_(all, 1) then grad *= mask."""
    from accelerate import Accelerator

    from erasure.training import masked_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    mask_tensors = {"weight": torch.rand(3, 4) < 0.5, "bias": torch.tensor([True, False, True])}
    x = torch.randn(5, 4)

    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    (reference(x).square().sum() * 100).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    for name, p in reference.named_parameters():
        p.grad *= mask_tensors[name]
    reference_opt.step()

    from erasure.saliency import Mask

    mask = Mask(mask_tensors, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    masked_step(model(x).square().sum() * 100, accelerator=Accelerator(cpu=True), model=model, optimizer=optimizer,
                mask=mask, grad_clip=1.0, clip_before_mask=True)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=False):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_gradient_ascent_is_the_negated_summed_loss() -> None:
    """The reference's `--method ga`: forget_loss = -noise_estimation_loss_conditional (summed per image)."""
    unet, scheduler, config, forget = _setup(method="ga", label_dropout=0.0)
    x0, labels = take(forget, BATCH, 0, 0, 1, flip=False)
    ours = commands.forget_objective(config, scheduler)(unet, (x0, labels, 2))
    x_t, t, e = _reference_noised(scheduler, x0, stream_generator(config.seed, commands.NOISE_STREAM, 2), True)
    reference = -(e - unet(x_t, t, class_labels=labels).sample).square().sum(dim=(1, 2, 3)).mean(dim=0)
    torch.testing.assert_close(ours, reference)


def test_label_dropout_replaces_labels_by_the_null_class_in_training_forwards_only() -> None:
    """The reference model drops labels at cond_drop_prob 0.1 in every train-mode forward; the probe does not."""
    unet, scheduler, config, forget = _setup(method="ga", label_dropout=0.5)
    x0, labels = take(forget, BATCH, 0, 0, 1, flip=False)
    seen = []
    forward = unet.forward
    unet.forward = lambda *a, **k: seen.append(k["class_labels"].clone()) or forward(*a, **k)
    commands.forget_objective(config, scheduler)(unet, (x0, labels, 2))
    assert (seen[-1] == NULL_CLASS).any() and (seen[-1] != NULL_CLASS).any()
    commands.forget_objective(config, scheduler, train_mode=False)(unet, (x0, labels, 2))
    assert not (seen[-1] == NULL_CLASS).any()
