"""Weight-saliency masks: which weights to update when unlearning a forget set.

The saliency of a weight is |g|, where g is the gradient of the forget loss summed
over the whole forget set. `compute_mask` keeps the most salient weights (a ratio of
all entries, or those above a threshold); training then updates only those weights.

Recommended training loop::

    mask = compute_mask(model, forget_batches, loss_fn, ratio=0.5)
    optimizer = torch.optim.AdamW(masked_parameters(model, mask), lr=1e-5)
    mask.protect_unmasked(model, optimizer)      # once, after building the optimizer
    for batch in loader:
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        mask.apply_to_grads(model)               # before clipping: the norm sees only masked grads
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()                         # the hook restores every unmasked weight

`apply_to_grads` alone is not enough: weight decay and momentum still move weights
whose gradient is zero. `protect_unmasked` guarantees that unmasked weights stay
bit-identical to their values when it was called.

A mask may also be soft (`compute_mask(..., soft_temperature=t)` or `soft_mask`): float32
weights in [0, 1] that scale each gradient instead of keeping or zeroing it. Only entries
whose weight is exactly 0 count as unmasked; as t -> 0 a soft mask becomes the hard one.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from erasure.errors import MaskError
from erasure.io import atomic_path

if TYPE_CHECKING:
    import accelerate

ParamFilter = str | Callable[[str], bool] | None
"""Which parameters a mask covers: a regex searched in the name, a predicate, or None for all."""

FORMAT = "erasure-mask/v1"
_CHUNK = 1 << 24  # elements per histogram step: bounds the selection's scratch memory
_BUCKETS = 1 << 16  # radix select works on 16 bits at a time
_FIRST_NON_FINITE = 0x7F80  # high 16 bits of +inf; NaN lies above, negative floats from 0x8000


class GradientSum(NamedTuple):
    """Signed forget-loss gradients summed over the forget set (float32, one per parameter)."""

    grads: dict[str, Tensor]
    samples: int
    batches: int
    shards: dict[str, Tensor] | None = None
    """For an FSDP2-sharded model: the parameters (DTensors) whose local shards `grads` holds; else None."""


# ---------------------------------------------------------------------------- computing masks


def compute_mask(
    model: nn.Module,
    forget_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    ratio: float | None = None,
    threshold: float | None = None,
    params: ParamFilter = None,
    grad_clip: float | None = None,
    accelerator: accelerate.Accelerator | None = None,
    loss_name: str = "forget_loss",
    progress: bool = True,
    soft_temperature: float | None = None,
) -> Mask:
    """Build a saliency mask from the gradient of `loss_fn(model, batch)` over `forget_batches`.

    Give exactly one of `ratio` (keep that fraction of entries with the largest |g|; ties
    at the cut keep the earliest entries in parameter then index order) or `threshold`
    (keep entries with |g| >= threshold). With `soft_temperature`, the mask is soft around
    the same cut (see `soft_mask`). See `accumulate_gradients` for the other arguments;
    under a multi-process `accelerator` every rank returns the same mask. On an FSDP2-sharded model the
    gradients and scores stay sharded: only the selection's histograms and counts are all-reduced, and the
    whole-parameter masks (which `Mask` holds on every rank) are gathered at the end, ties at the cut kept in
    the one-process (parameter, index) order, so the mask is the one a single process would select.
    """
    _check_selection(ratio, threshold)
    summed = accumulate_gradients(
        model, forget_batches, loss_fn, params=params, grad_clip=grad_clip,
        accelerator=accelerator, progress=progress,
    )
    scores = {name: g.abs_() for name, g in summed.grads.items()}
    sharded = summed.shards is not None
    if sharded:
        masks, used = _select_on_shards(scores, summed.shards, ratio, threshold, soft_temperature)
    elif soft_temperature is None:
        masks, used = select_mask(scores, ratio=ratio, threshold=threshold)
    else:
        masks, used = soft_mask(scores, temperature=soft_temperature, ratio=ratio, threshold=threshold)
    masks = {name: m.cpu() for name, m in masks.items()}
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    metadata = {
        "mode": "ratio" if ratio is not None else "threshold",
        "ratio": ratio,
        "threshold": threshold,
        "threshold_used": used,
        "density": sum(float(m.sum()) for m in masks.values()) / numel,
        "kept": kept,
        "numel": numel,
        "loss_name": loss_name,
        "forget_samples": summed.samples,
        "forget_batches": summed.batches,
        "param_filter": _describe_filter(params),
        "grad_clip": grad_clip,
        "model_class": class_name(_unwrap(model, accelerator)),
        "world_size": _world_size(accelerator),
        "sharded": sharded,
    }
    if soft_temperature is not None:
        metadata["soft_temperature"] = soft_temperature
    return Mask(masks, metadata, soft=soft_temperature is not None)


def accumulate_gradients(
    model: nn.Module,
    forget_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    params: ParamFilter = None,
    grad_clip: float | None = None,
    accelerator: accelerate.Accelerator | None = None,
    progress: bool = True,
) -> GradientSum:
    """Sum the signed gradient of `loss_fn(model, batch)` over all batches, per parameter.

    `params` picks the parameters (among those with requires_grad); `grad_clip` clips each
    batch's gradient to that global L2 norm before adding it. The model's `.grad` fields
    and its train/eval mode are left untouched (call `model.eval()` first if dropout or
    batch-norm statistics should not vary). With a multi-process `accelerator`, pass the
    same un-sharded batches on every rank: rank r uses batches i with i % world == r and
    the sums are all-reduced, so every rank gets the same result.

    On a model sharded by FSDP2 (`fully_shard`, or Accelerate's `--fsdp_version 2`: its parameters are
    DTensors) every rank runs every batch, since the shards' all-gathers and reduce-scatters need all ranks,
    and keeps only its own shard of each sum (`GradientSum.shards` names the parameters). The reduce-scatter
    averages the ranks' identical gradients, so each shard is the one-process batch gradient's; the pass
    costs what one process's does, and no rank ever holds a whole gradient.
    """
    if grad_clip is not None and not grad_clip > 0:
        raise MaskError(f"grad_clip must be > 0 (got {grad_clip}); pass a positive norm or grad_clip=None")
    base = _unwrap(model, accelerator)
    named = _select_parameters(base, params)
    if _is_sharded(named):
        return _accumulate_on_shards(base, named, forget_batches, loss_fn, grad_clip, progress)
    rank, world = _rank_and_world(accelerator, forget_batches)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in named]
    samples = batches = 0
    for index, batch in enumerate(_progress(forget_batches, progress, rank)):
        samples += _count_samples(batch)
        batches += 1
        if index % world == rank:
            _add_batch_gradient(sums, base, [p for _, p in named], loss_fn, batch, grad_clip)
    if world > 1:
        for s in sums:
            torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM)
    return _gradient_sum(named, sums, samples, batches)


def _gradient_sum(named: list[tuple[str, nn.Parameter]], sums: list[Tensor], samples: int, batches: int,
                  shards: dict[str, Tensor] | None = None) -> GradientSum:
    """The sums by parameter name, refusing an empty forget set."""
    if batches == 0:
        raise MaskError("the forget set is empty (no batches); pass a non-empty forget_batches iterable")
    return GradientSum({name: s for (name, _), s in zip(named, sums, strict=True)}, samples, batches, shards)


def _is_sharded(named: list[tuple[str, nn.Parameter]]) -> bool:
    """Whether the selected parameters are FSDP2 shards (DTensors); refuses a mix of both kinds."""
    kinds = {_is_dtensor(p) for _, p in named}
    if len(kinds) == 2:
        plain = [name for name, p in named if not _is_dtensor(p)]
        raise MaskError(
            f"{len(plain)} selected parameters (e.g. {plain[0]}) are not FSDP2-sharded while the others are; "
            "shard the whole model with fully_shard, or select one kind with params=..."
        )
    if kinds != {True}:
        return False
    if not torch.distributed.is_initialized():
        raise MaskError("the model is FSDP2-sharded but torch.distributed is not initialised; run under "
                        "`accelerate launch` (or torch.distributed.init_process_group)")
    meshes = {(p.device_mesh.ndim, p.device_mesh.size()) for _, p in named}
    if meshes != {(1, torch.distributed.get_world_size())}:  # replicas would be counted once per copy
        raise MaskError(f"the mask pass needs parameters sharded over all {torch.distributed.get_world_size()} "
                        f"ranks on a 1-D mesh (got mesh dimensions and sizes {sorted(meshes)}); shard with plain "
                        "FSDP2 (fully_shard on the default mesh), not HSDP")
    return True


def _accumulate_on_shards(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    forget_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    grad_clip: float | None,
    progress: bool,
) -> GradientSum:
    """`accumulate_gradients` on an FSDP2-sharded model: every batch on every rank, sums kept as local shards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in trainable]
    sums = [torch.zeros(_local(p).shape, dtype=torch.float32, device=_local(p).device) for _, p in named]
    samples = batches = 0
    try:
        for batch in _progress(forget_batches, progress, torch.distributed.get_rank()):
            for p in trainable:
                p.grad = None
            with torch.enable_grad():
                _checked_loss(loss_fn(model, batch)).backward()
            grads = [None if p.grad is None else _local(p.grad) for _, p in named]
            _add_scaled(sums, grads, _clip_scale([g for g in grads if g is not None], grad_clip, _sum_over_ranks))
            samples += _count_samples(batch)
            batches += 1
    finally:
        for p, grad in zip(trainable, saved, strict=True):
            p.grad = grad
    return _gradient_sum(named, sums, samples, batches, shards=dict(named))


def _world_size(accelerator: accelerate.Accelerator | None) -> int:
    """Processes taking part: the accelerator's, else torch.distributed's, else 1."""
    if accelerator is not None:
        return accelerator.num_processes
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _check_selection(ratio: float | None, threshold: float | None) -> None:
    """Require exactly one of ratio in (0, 1) or threshold >= 0."""
    if (ratio is None) == (threshold is None):
        raise MaskError("give exactly one of ratio=... (fraction of weights to keep) or threshold=... (minimum |grad|)")
    if ratio is not None and not 0 < ratio < 1:
        raise MaskError(
            f"ratio must be in (0, 1), exclusive (got {ratio}); to keep weights by |grad| use "
            "threshold=..., and to update all weights use no mask"
        )
    if threshold is not None and not threshold >= 0:
        raise MaskError(f"threshold must be >= 0 (got {threshold}); pass a non-negative |grad| cut-off")


def class_name(model: nn.Module) -> str:
    """The model's class name; for a model FSDP2 sharded (whose class `fully_shard` swaps for a subclass named
    FSDP<name>), the original class's."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def _unwrap(model: nn.Module, accelerator: accelerate.Accelerator | None) -> nn.Module:
    """Return the bare model behind DistributedDataParallel / DataParallel wrappers."""
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _select_parameters(model: nn.Module, params: ParamFilter) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose names pass `params`, in model order."""
    try:
        keep = re.compile(params).search if isinstance(params, str) else params
    except re.error as error:
        raise MaskError(f"params={params!r} is not a valid regular expression ({error}); fix the pattern") from error
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (keep is None or keep(n))]
    if not named:
        raise MaskError(
            f"no trainable parameter of {type(model).__name__} matches params={_describe_filter(params)}; "
            "check the filter against the names in model.named_parameters()"
        )
    return named


def _describe_filter(params: ParamFilter) -> str | None:
    """A JSON-friendly description of a parameter filter."""
    if params is None or isinstance(params, str):
        return params
    return f"callable:{getattr(params, '__qualname__', repr(params))}"


def _rank_and_world(accelerator: accelerate.Accelerator | None, batches: Iterable[Any]) -> tuple[int, int]:
    """This process's rank and the world size, refusing batches that are already sharded."""
    if accelerator is None or accelerator.num_processes == 1:
        return 0, 1
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    if isinstance(batches, (DataLoaderShard, DataLoaderDispatcher)):
        raise MaskError(
            "forget_batches was passed through accelerator.prepare and is already sharded; "
            "pass the un-prepared DataLoader (compute_mask shards the batches itself)"
        )
    return accelerator.process_index, accelerator.num_processes


def _progress(batches: Iterable[Any], enabled: bool, rank: int) -> Iterable[Any]:
    """Wrap `batches` in a progress bar shown only on the main process."""
    return tqdm(batches, desc="saliency", unit="batch", disable=not enabled or rank != 0)


def _count_samples(batch: Any) -> int:
    """Samples in one batch: the leading size of its first tensor, else its length, else 1."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = list(batch.values()) if isinstance(batch, Mapping) else batch
    if not isinstance(items, (list, tuple)):
        return 1
    for item in items:
        if isinstance(item, Tensor) and item.dim():
            return int(item.shape[0])
    if isinstance(batch, Mapping):
        sized = [len(v) for v in items if isinstance(v, (list, tuple))]
        return sized[0] if sized else 1
    return len(items)


def _add_batch_gradient(
    sums: list[Tensor],
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    grad_clip: float | None,
) -> None:
    """Add one batch's (optionally norm-clipped) gradient into the float32 sums."""
    with torch.enable_grad():
        loss = _checked_loss(loss_fn(model, batch))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    _add_scaled(sums, grads, _clip_scale([g for g in grads if g is not None], grad_clip))


def _add_scaled(sums: list[Tensor], grads: Iterable[Tensor | None], scale: float) -> None:
    """Add each gradient (None: the parameter was unused) times `scale` into its float32 sum."""
    for s, g in zip(sums, grads, strict=True):
        if g is not None:
            s.add_(g, alpha=scale)


def _checked_loss(loss: Any) -> Tensor:
    """`loss` as a 0-d tensor, refusing what cannot give a gradient."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise MaskError("loss_fn must return a scalar tensor; reduce the per-sample losses with .mean() or .sum()")
    if not loss.requires_grad:
        raise MaskError(
            "the forget loss does not depend on the selected parameters; compute it from the "
            "model's output outside torch.no_grad() and check the params filter"
        )
    return loss.reshape(())


def _clip_scale(
    grads: list[Tensor], grad_clip: float | None, reduce: Callable[[Tensor], Tensor] | None = None
) -> float:
    """The factor that brings the global L2 norm of `grads` to at most `grad_clip`; with `reduce` (the sum over
    ranks), `grads` are this rank's shards and the norm is that of the whole gradients."""
    if grad_clip is None:
        return 1.0
    if reduce is None:
        if not grads:
            return 1.0
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(grads[0].device) for g in grads])
        norm = float(torch.linalg.vector_norm(norms))
    else:  # every rank must join the reduction, even one whose shards are all empty
        device = grads[0].device if grads else torch.device("cpu")
        squares = sum((torch.linalg.vector_norm(g, dtype=torch.float64).square().to(device) for g in grads),
                      torch.zeros((), dtype=torch.float64, device=device))
        norm = float(reduce(squares.reshape(1)).sqrt())
    return min(1.0, grad_clip / (norm + 1e-6))


# ---------------------------------------------------------------------------- exact selection


def select_mask(
    scores: dict[str, Tensor], *, ratio: float | None = None, threshold: float | None = None, sharded: bool = False
) -> tuple[dict[str, Tensor], float]:
    """Select entries of non-negative float32 `scores` globally; return bool masks and the cut used.

    ratio: keep exactly int(ratio * n) entries (the floor, as the SalUn reference) with the largest score;
    of the entries equal to the cut value, the earliest in (dict order, flat index) are kept. threshold: keep
    scores >= threshold. The cut is found by an exact two-pass radix select over the float32
    bit patterns (monotonic for non-negative floats), so the scores are never concatenated.
    NaN, inf and negative scores raise MaskError.

    sharded: `scores` are this rank's part of scores spread over the ranks of the default
    torch.distributed group (e.g. FSDP shards of the gradient). Only the 2^16-bucket histograms and
    a few counts are all-reduced, never the scores; each rank gets the mask of its own part, and
    together they are the mask one process selects from all scores, ties at the cut broken in
    (rank, dict order, flat index) order: the global order when rank r holds the r-th consecutive piece.
    """
    _check_selection(ratio, threshold)
    reduce = _sum_over_ranks if sharded else _identity
    scores, high = _histogrammed(scores, reduce)
    if threshold is not None:
        return {name: s >= threshold for name, s in scores.items()}, float(threshold)
    cut, k = _cut(scores, high, ratio, reduce)
    return _keep_top(scores, cut, k, sharded), _bits_to_float(cut)


def _histogrammed(scores: dict[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Checked, contiguous scores and the (reduced) histogram of their high 16 bits."""
    _check_scores(scores)
    scores = {name: s.contiguous() for name, s in scores.items()}
    high = reduce(_histogram(scores))
    _check_finite(high)
    return scores, high


def _cut(scores: dict[str, Tensor], high: Tensor, ratio: float, reduce: Callable[[Tensor], Tensor]) -> tuple[int, int]:
    """The bit pattern of the k-th largest score and k = int(ratio * n), the entries to keep."""
    n = int(high.sum())
    k = int(ratio * n)
    if k == 0:
        raise MaskError(f"ratio={ratio} keeps no entry out of {n}; raise the ratio")
    return _kth_largest(scores, high, k, reduce), k


def _select_on_shards(
    scores: dict[str, Tensor], shards: dict[str, Tensor], ratio: float | None, threshold: float | None,
    soft_temperature: float | None,
) -> tuple[dict[str, Tensor], float]:
    """Whole-parameter masks, the same on every rank, from each rank's FSDP2 shards of the scores: the cut from
    all-reduced histograms, then each shard's mask gathered. Ties at the cut are dropped in (parameter, index)
    order over the gathered masks, so the mask is the one-process selection (a shard is not a consecutive
    piece of all scores, so select_mask's rank order would differ)."""
    if soft_temperature is not None or threshold is not None:
        local, used = (select_mask(scores, threshold=threshold, sharded=True) if soft_temperature is None else
                       soft_mask(scores, temperature=soft_temperature, ratio=ratio, threshold=threshold, sharded=True))
        return {name: _gathered(m, shards[name]) for name, m in local.items()}, used
    scores, high = _histogrammed(scores, _sum_over_ranks)
    cut, k = _cut(scores, high, ratio, _sum_over_ranks)
    masks = {name: _gathered(s.view(torch.int32) >= cut, shards[name]) for name, s in scores.items()}
    surplus = sum(int(torch.count_nonzero(m)) for m in masks.values()) - k
    # the same surplus and names on every rank, so every rank gathers the same ties in the same order
    _drop_last_ties(masks, lambda name: _gathered(scores[name].view(torch.int32) == cut, shards[name]), surplus)
    return masks, _bits_to_float(cut)


def _gathered(local: Tensor, shard_of: Tensor) -> Tensor:
    """The whole tensor whose piece on each rank is `local`, split as the DTensor `shard_of` is; on the CPU."""
    from torch.distributed.tensor import DTensor

    wire = local.to(torch.uint8) if local.dtype == torch.bool else local  # collectives need a numeric type
    whole = DTensor.from_local(wire, shard_of.device_mesh, shard_of.placements, shape=shard_of.shape,
                               stride=shard_of.stride()).full_tensor()
    return whole.to(local.dtype).cpu()


def soft_mask(
    scores: dict[str, Tensor], *, temperature: float, ratio: float | None = None, threshold: float | None = None,
    sharded: bool = False,
) -> tuple[dict[str, Tensor], float]:
    """A soft mask: sigmoid((score - cut) / (temperature * mean score)) per entry, and the cut.

    The cut is the one `select_mask` uses for the same ratio or threshold, so as temperature -> 0
    the weights tend to the hard mask's 0 and 1 (entries equal to the cut get 0.5). Weights are
    float32 in [0, 1]; the mean score makes `temperature` independent of the gradients' scale.
    `sharded` as in `select_mask` (the cut and the mean are then those of all ranks' scores).
    """
    if not temperature > 0:
        raise MaskError(f"temperature must be > 0 (got {temperature}); use the hard mask (select_mask) for the limit 0")
    _, cut = select_mask(scores, ratio=ratio, threshold=threshold, sharded=sharded)
    device = next(iter(scores.values())).device
    sums = torch.tensor([sum(float(s.sum(dtype=torch.float64)) for s in scores.values()),
                         sum(s.numel() for s in scores.values())], dtype=torch.float64, device=device)
    total, count = (_sum_over_ranks(sums) if sharded else sums).tolist()
    mean = total / count
    scale = temperature * (mean if mean > 0 else 1.0)
    return {name: torch.sigmoid((s - cut) / scale) for name, s in scores.items()}, cut


def _identity(counts: Tensor) -> Tensor:
    return counts


def _sum_over_ranks(counts: Tensor) -> Tensor:
    """`counts` summed over the ranks of the default process group (in place)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MaskError("sharded=True needs an initialised torch.distributed process group; run under "
                        "`accelerate launch` (or torch.distributed.init_process_group), or pass sharded=False")
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    return counts


def _check_scores(scores: dict[str, Tensor]) -> None:
    """Scores must be a non-empty dict of float32 tensors."""
    if not scores:
        raise MaskError("there are no scores to select from; pass at least one tensor")
    wrong = [name for name, s in scores.items() if s.dtype != torch.float32]
    if wrong:
        raise MaskError(f"scores must be float32 but {wrong} are not; convert them with .float()")


class _Block(NamedTuple):
    """Up to _CHUNK score bit patterns, with same-sized scratch buffers that may be overwritten."""

    bits: Tensor
    ints: Tensor
    flags: Tensor


def _blocks(scores: dict[str, Tensor]) -> Iterator[_Block]:
    """All (contiguous) scores' bit patterns in blocks of up to _CHUNK, device by device."""
    devices = dict.fromkeys(s.device for s in scores.values())
    for device in devices:
        yield from _device_blocks([s for s in scores.values() if s.device == device])


def _device_blocks(tensors: list[Tensor]) -> Iterator[_Block]:
    """Blocks of the bit patterns of `tensors` (one device), small tensors packed together.

    Packing and reusing the scratch buffers keep the operations and allocations of a pass
    near n / _CHUNK even for models made of thousands of small tensors.
    """
    size, device = min(_CHUNK, sum(t.numel() for t in tensors)), tensors[0].device
    pack = torch.empty(size, dtype=torch.int32, device=device)
    ints = torch.empty(size, dtype=torch.int32, device=device)
    flags = torch.empty(size, dtype=torch.bool, device=device)
    filled = 0
    for t in tensors:
        flat = t.view(torch.int32).view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start : start + _CHUNK]
            if piece.numel() == size:
                yield _Block(piece, ints, flags)
                continue
            if filled + piece.numel() > size:
                yield _Block(pack[:filled], ints[:filled], flags[:filled])
                filled = 0
            pack[filled : filled + piece.numel()] = piece
            filled += piece.numel()
    if filled:
        yield _Block(pack[:filled], ints[:filled], flags[:filled])


def _histogram(scores: dict[str, Tensor]) -> Tensor:
    """Pass 1: counts of the high 16 bits of every score's bit pattern."""
    counts = torch.zeros(_BUCKETS, dtype=torch.int64, device=next(iter(scores.values())).device)
    for block in _blocks(scores):
        high = torch.bitwise_right_shift(block.bits, 16, out=block.ints).bitwise_and_(0xFFFF)
        counts += torch.bincount(high, minlength=_BUCKETS).to(counts.device)
    return counts


def _check_finite(high: Tensor) -> None:
    """Refuse NaN, inf and negative scores, which the histogram shows in its top buckets."""
    if int(high[_FIRST_NON_FINITE:0x8000].sum()):
        raise MaskError(
            "saliency scores contain NaN or inf (a non-finite forget-loss gradient); check loss_fn "
            "for overflow (compute it in float32) or use a model checkpoint that gives finite losses"
        )
    if int(high[0x8000:].sum()):
        raise MaskError("scores must be non-negative; pass absolute values, e.g. {name: g.abs() for ...}")


def _top_bucket(counts: Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([k], device=counts.device)))
    bucket = counts.numel() - 1 - index
    return bucket, int(from_top[index]) - int(counts[bucket])


def _kth_largest(scores: dict[str, Tensor], high: Tensor, k: int, reduce: Callable[[Tensor], Tensor]) -> int:
    """Pass 2: the bit pattern of the exact k-th largest score, from the low 16 bits in its bucket."""
    bucket, above = _top_bucket(high, k)
    counts = torch.zeros(_BUCKETS, dtype=torch.int64, device=high.device)
    for block in _blocks(scores):
        shifted = torch.bitwise_right_shift(block.bits, 16, out=block.ints)
        inside = block.bits[torch.eq(shifted, bucket, out=block.flags)]
        counts += torch.bincount(inside.bitwise_and_(0xFFFF), minlength=_BUCKETS).to(counts.device)
    low, _ = _top_bucket(reduce(counts), k - above)
    return (bucket << 16) | low


def _bits_to_float(bits: int) -> float:
    """The float32 whose bit pattern is `bits`."""
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _keep_top(scores: dict[str, Tensor], cut: int, k: int, sharded: bool = False) -> dict[str, Tensor]:
    """Masks of the k largest: every score whose bits are >= `cut`, less the last surplus ties.

    Comparing bit patterns rather than floats keeps the result exact even where a device
    flushes subnormal floats to zero. Without ties at the cut there is no surplus to remove.
    Sharded, the surplus ties are dropped from the last rank backwards.
    """
    masks = {name: s.view(torch.int32) >= cut for name, s in scores.items()}
    surplus = sum(int(torch.count_nonzero(m)) for m in masks.values()) - k
    if sharded:
        surplus = _surplus_of_this_rank(scores, masks, cut, k)
    _drop_last_ties(masks, lambda name: scores[name].view(torch.int32) == cut, surplus)
    return masks


def _drop_last_ties(masks: dict[str, Tensor], ties_of: Callable[[str], Tensor], surplus: int) -> None:
    """Unselect the last `surplus` entries at the cut (`ties_of(name)`, all selected) in (dict, index) order."""
    for name in reversed(masks):
        if surplus == 0:
            break
        ties = ties_of(name).view(-1).nonzero().squeeze(1)[-surplus:]
        masks[name].view(-1)[ties] = False
        surplus -= ties.numel()


def _surplus_of_this_rank(scores: dict[str, Tensor], masks: dict[str, Tensor], cut: int, k: int) -> int:
    """How many of its ties at the cut this rank drops: the global surplus, taken from the last rank's ties first."""
    device = next(iter(scores.values())).device
    mine = torch.tensor([sum(int(torch.count_nonzero(m)) for m in masks.values()),
                         sum(int(torch.count_nonzero(s.view(torch.int32) == cut)) for s in scores.values())],
                        dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    kept, ties = zip(*(t.tolist() for t in every), strict=True)
    surplus, drops = sum(kept) - k, []
    for rank_ties in reversed(ties):
        drops.append(min(rank_ties, surplus))
        surplus -= drops[-1]
    return drops[::-1][torch.distributed.get_rank()]


# ---------------------------------------------------------------------------- the mask


class Mask:
    """Per-parameter masks plus JSON metadata: bool (True = the weight may be updated) or soft.

    A soft mask holds float32 weights in [0, 1] that scale each entry's gradient; an entry is
    unmasked (frozen) only where its weight is exactly 0.
    """

    def __init__(self, masks: dict[str, Tensor], metadata: dict[str, Any] | None = None, *, soft: bool = False) -> None:
        """Wrap bool `masks` (or, when `soft`, float32 weights in [0, 1]), kept on CPU, and their `metadata`."""
        dtype = torch.float32 if soft else torch.bool
        wrong = [name for name, m in masks.items() if not isinstance(m, Tensor) or m.dtype != dtype]
        if wrong:
            raise MaskError(f"mask tensors must be {dtype} but {wrong} are not; convert them with "
                            f"{'.float()' if soft else '.bool() (or pass soft=True for float32 weights in [0, 1])'}")
        if soft:
            _check_soft(masks)
        self.is_soft = soft
        self.masks: dict[str, Tensor] = {name: m.detach().cpu() for name, m in masks.items()}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._frozen: dict[tuple[str, torch.device], Tensor] = {}
        self._weights: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        return self.masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density:.4f})"

    @property
    def density(self) -> float:
        """Fraction of all entries that are selected (for a soft mask: the mean weight)."""
        return self.summary()["density"]

    def stats(self) -> list[dict[str, Any]]:
        """One row per parameter: name, shape, numel, kept (non-zero entries), density (mean weight).

        Totals are in `summary()`.
        """
        rows = []
        for name, m in self.masks.items():
            rows.append({"name": name, "shape": list(m.shape), "numel": m.numel(), "kept": int(torch.count_nonzero(m)),
                         "density": _weight(m) / m.numel() if m.numel() else 0.0})
        return rows

    def summary(self) -> dict[str, Any]:
        """Totals over all parameters: tensors, numel, kept (non-zero entries), density (mean weight)."""
        numel = sum(m.numel() for m in self.masks.values())
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())
        weight = sum(_weight(m) for m in self.masks.values())
        return {"tensors": len(self), "numel": numel, "kept": kept, "density": weight / numel if numel else 0.0}

    # -------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike[str], *, packed: bool = False) -> None:
        """Write a safetensors file atomically: bool tensors, or bits packed 8 per uint8 byte
        (little bit order, like numpy.packbits(bitorder="little")) when `packed`; a soft mask
        is written as float32 tensors and cannot be packed.

        String metadata: "format", "packing" ("bool", "bits-le" or "float"), "erasure.mask" (the
        JSON metadata) and "erasure.shapes" (JSON {name: shape} in parameter order).
        """
        if packed and self.is_soft:
            raise MaskError("a soft mask cannot be bit-packed; save it with packed=False")
        tensors = {name: _pack(m) if packed else m.contiguous() for name, m in self.masks.items()}
        header = {
            "format": FORMAT,
            "packing": "float" if self.is_soft else "bits-le" if packed else "bool",
            "erasure.mask": _to_json(self.metadata),
            "erasure.shapes": json.dumps({name: list(m.shape) for name, m in self.masks.items()}),
        }
        _atomic_save(tensors, header, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> Mask:
        """Read a mask written by `save`; with `model`, also check that it fits (see `validate`)."""
        tensors, header = _read_safetensors(os.fspath(path))
        if header.get("format") != FORMAT:
            raise MaskError(
                f"{path} is not an erasure mask (format {header.get('format')!r}); recompute it with compute_mask"
            )
        shapes = json.loads(header["erasure.shapes"])  # also restores the parameter order
        if header.get("packing") == "bits-le":
            tensors = {name: _unpack(tensors[name], shape) for name, shape in shapes.items()}
        mask = cls({name: tensors[name] for name in shapes}, json.loads(header["erasure.mask"]),
                   soft=header.get("packing") == "float")
        if model is not None:
            mask.validate(model)
        return mask

    def validate(self, model: nn.Module) -> None:
        """Raise one MaskError listing every mask entry the model lacks or shapes differently.

        Model parameters absent from the mask are fine: they are frozen.
        """
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        model_class = class_name(model)
        if self.masks and not any(name in shapes for name in self.masks):
            raise MaskError(
                f"none of the mask's {len(self)} parameter names exist in {model_class}; the mask looks made "
                f"for another model ({self.metadata.get('model_class', 'unknown class')}): recompute it for this model"
            )
        problems = [_mismatch(name, tuple(m.shape), shapes.get(name)) for name, m in self.masks.items()]
        problems = [p for p in problems if p]
        if problems:
            raise MaskError(
                f"the mask does not fit {model_class} ({len(problems)} problems: {'; '.join(problems)}); "
                "recompute the mask for this model or load the model it was made for"
            )

    # -------------------------------------------------------------------- training

    def apply_to_grads(self, model: nn.Module) -> None:
        """Zero, in place, the gradient of every unmasked entry (a soft mask multiplies it by its
        weight); parameters not in the mask lose all of it. A parameter sharded by FSDP2 (a DTensor) is
        masked on its own shard, with the same shard of the mask: no communication."""
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            frozen, grad = self._frozen_on(name, p), _local(p.grad)
            if frozen is None:
                grad.zero_()
            elif self.is_soft:
                grad.mul_(self._weights_on(name, p))
            else:
                grad.masked_fill_(frozen, 0)

    def protect_unmasked(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Keep every unmasked weight bit-identical to its current value, whatever the optimizer does.

        Unmasked means weight exactly 0: a soft mask freezes only its zero entries (and the
        parameters it does not cover), so weight decay still moves its partially masked entries.
        Saves the unmasked values of the optimizer's parameters now and restores them after
        every `optimizer.step()`. Call once, after moving the model to its device and building
        the optimizer. Remove the protection with the returned handle's `.remove()`.
        """
        saved = [self._unmasked_values(name, p) for name, p in _optimizer_parameters(model, optimizer)]
        saved = [entry for entry in saved if entry is not None]

        def restore(*_: Any) -> None:
            with torch.no_grad():
                for p, frozen, values in saved:
                    if frozen is None:
                        _local(p).copy_(values)
                    else:
                        _local(p).masked_scatter_(frozen, values)

        return optimizer.register_step_post_hook(restore)

    def _frozen_on(self, name: str, p: Tensor) -> Tensor | None:
        """The inverted mask (True = keep fixed) of `name` on p's device (on p's shard when p is an FSDP2
        DTensor), cached; None if not in the mask."""
        if name not in self.masks:
            return None
        key = (name, p.device)
        if key not in self._frozen:
            if self.masks[name].shape != p.shape:
                raise MaskError(
                    f"mask for {name} has shape {tuple(self.masks[name].shape)} but the parameter has "
                    f"{tuple(p.shape)}; recompute the mask for this model"
                )
            self._frozen[key] = _shard_like(self.masks[name] == 0, p)
        return self._frozen[key]

    def _weights_on(self, name: str, p: Tensor) -> Tensor:
        """The soft weights of `name` on p's device and in p's gradient dtype (on p's shard), cached."""
        key = (name, p.device, p.dtype)
        if key not in self._weights:
            self._weights[key] = _shard_like(self.masks[name].to(dtype=p.dtype), p)
        return self._weights[key]

    def _unmasked_values(self, name: str, p: nn.Parameter) -> tuple[Tensor, Tensor | None, Tensor] | None:
        """(param, frozen mask or None for all-frozen, saved values), or None if nothing is frozen (all on p's
        shard for a DTensor)."""
        frozen, local = self._frozen_on(name, p), _local(p).detach()
        if frozen is None:
            return p, None, local.clone()
        if not bool(frozen.any()):
            return None
        return p, frozen, local[frozen].clone()


def _is_dtensor(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard), told by its mesh without importing torch.distributed.tensor."""
    return hasattr(tensor, "device_mesh")


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of an FSDP2-sharded tensor (a DTensor; the same storage), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_like(full: Tensor, p: Tensor) -> Tensor:
    """`full` (a whole-parameter mask, the same on every rank) on p's device, cut to p's shard when p is a
    DTensor: each rank keeps its own piece of its own copy, so nothing is communicated."""
    if not _is_dtensor(p):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()


def masked_parameters(model: nn.Module, mask: Mask) -> list[nn.Parameter]:
    """The parameters with at least one selected (non-zero) entry: build the optimizer over these only."""
    return [p for name, p in model.named_parameters() if name in mask and bool(mask[name].any())]


def _optimizer_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter the optimizer updates, named after the model."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    strangers = sum(id(p) not in names for p in params)
    if strangers:
        raise MaskError(
            f"the optimizer holds {strangers} parameters that are not in {type(model).__name__}; "
            "pass the model the optimizer was built for (unwrapped, e.g. accelerator.unwrap_model(model))"
        )
    return [(names[id(p)], p) for p in params]


def _mismatch(name: str, mask_shape: tuple[int, ...], model_shape: tuple[int, ...] | None) -> str | None:
    """Describe why a mask entry does not fit the model, or None if it fits."""
    if model_shape is None:
        return f"{name} is not a parameter of the model"
    if mask_shape != model_shape:
        return f"{name} has shape {mask_shape} in the mask but {model_shape} in the model"
    return None


def _weight(m: Tensor) -> float:
    """The sum of a mask's weights (its count of True entries for a bool mask)."""
    return float(m.sum(dtype=torch.float64))


def _check_soft(masks: dict[str, Tensor]) -> None:
    """Soft mask weights must lie in [0, 1] (NaN fails too)."""
    wrong = [name for name, m in masks.items() if not bool(((m >= 0) & (m <= 1)).all())]
    if wrong:
        raise MaskError(f"soft mask weights must lie in [0, 1] but {wrong} have others; clamp them with .clamp(0, 1)")


def _pack(m: Tensor) -> Tensor:
    """Bit-pack a bool tensor, 8 entries per byte, least significant bit first."""
    return torch.from_numpy(np.packbits(m.reshape(-1).numpy(), bitorder="little"))


def _unpack(packed: Tensor, shape: list[int]) -> Tensor:
    """Invert `_pack` for a tensor of `shape`."""
    count = math.prod(shape)
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _to_json(metadata: dict[str, Any]) -> str:
    """Encode metadata as JSON, refusing values that would not round-trip."""
    try:
        return json.dumps(metadata)
    except TypeError as error:
        raise MaskError(
            f"mask metadata is not JSON-serialisable ({error}); store only str, number, bool, None, list or dict values"
        ) from error


def _atomic_save(tensors: dict[str, Tensor], header: dict[str, str], path: str) -> None:
    """Write a safetensors file atomically (temp file beside it, then rename)."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _read_safetensors(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file."""
    if not os.path.isfile(path):
        raise MaskError(f"mask file {path} does not exist; fix the path or create it with compute_mask(...).save(path)")
    try:
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # safe_open is not a mapping
            return {name: f.get_tensor(name) for name in names}, f.metadata() or {}
    except SafetensorError as error:
        raise MaskError(f"{path} is not a readable safetensors file ({error}); recompute the mask") from error
