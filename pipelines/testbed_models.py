"""The testbed's components at CPU size: a word-level CLIP tokenizer, a small CLIP text encoder, a 16 px -> 8x8x4
AutoencoderKL, a two-level cross-attention UNet2DConditionModel and its schedulers. All standard diffusers /
transformers classes, so the saved pipeline loads with `StableDiffusionPipeline.from_pretrained`."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from erasure.errors import ErasureError
from pipelines.testbed_captions import all_words
from pipelines.tiny import TOKENIZER_DIR

TESTBED_NAME = "testbed"
TESTBED_DIR = Path(__file__).parent / "assets" / "testbed"
"""The committed testbed pipeline (`--model testbed`); its judge lies in JUDGE_DIR."""
JUDGE_DIR = Path(__file__).parent / "assets" / "testbed_judge"
RESOLUTION = 16
LATENT_SIZE = 8
LATENT_CHANNELS = 4
MAX_TOKENS = 16
"""Token positions of a prompt (start and end tokens included): every testbed caption fits."""
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def _chain(word: str) -> list[tuple[str, str]]:
    """The merges that join `word`'s characters left to right (CLIP marks the last character with </w>)."""
    parts, chain = [*word[:-1], word[-1] + "</w>"], []
    joined = parts[0]
    for part in parts[1:]:
        chain.append((joined, part))
        joined += part
    return chain


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """`word` split as CLIP's BPE splits it under `ranks` (always the lowest-ranked pair first)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:], strict=False)))
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words: list[str], rounds: int = 50) -> list[tuple[str, str]]:
    """Ranked BPE merges under which each of `words` is one token: a word that another word's merges split has its
    own chain moved to the front, until none is split."""
    order = list(dict.fromkeys(m for word in words for m in _chain(word)))
    for _ in range(rounds):
        ranks = {m: i for i, m in enumerate(order)}
        split = [word for word in words if len(_bpe(word, ranks)) > 1]
        if not split:
            return order
        for word in split:
            chain = _chain(word)
            order = chain + [m for m in order if m not in chain]
    raise ErasureError(f"no merge order keeps the caption words {split} whole; shorten the word list")


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """The byte-level tiny tokenizer plus merges that keep every caption word whole, written to `folder`."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    merges = word_merges(all_words())
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: CLIPTokenizer, width: int) -> CLIPTextModel:
    """A two-layer CLIP text encoder of hidden size `width` over `tokenizer`'s vocabulary and special ids."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae() -> AutoencoderKL:
    """16 px RGB <-> 8x8x4 latents: two levels (32, 64 channels), no attention."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION, mid_block_add_attention=False,
    )


def build_unet(width: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A UNet over 8x8x4 latents with cross-attention at the 4x4 level and in the middle block (where the class is
    decided; attention at 8x8 cost more than it gave on this CPU)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(width, 2 * width), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=16,
    )


def training_scheduler() -> DDPMScheduler:
    """The forward process the UNet is trained on (Ho et al.'s linear betas)."""
    return DDPMScheduler(**NOISE_SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    """The pipeline's scheduler: DDIM over the same betas."""
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
