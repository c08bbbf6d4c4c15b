"""Tiny randomly initialised Stable Diffusion, SDXL, SD3 and Flux components, built offline from small configs.

They show plumbing, not images: the tests and benchmarks run the pipelines on them, and they try the API without
weights, e.g. `StableDiffusionDNGPipeline(**sd_components(Path("tiny")))`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
MAX_LENGTH = 16
# Denoising steps of Stable Diffusion's own scheduler config.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# The flow-matching schedules the real folders ship: SD3's fixed shift, Flux-dev's resolution-dependent (dynamic)
# shift, Flux-schnell's none.
SD3_SCHEDULER = dict(shift=3.0)
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(shift=1.0)
T5_WORDS = ["▁a", "▁cat", "▁dog", "▁red"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE vocabulary is written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes plus a few merges, loaded back with from_pretrained."""
    # CLIPTokenizer(vocab_file=..., merges_file=...) ignores the files in transformers 5; from_pretrained reads them.
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return CLIPTokenizer.from_pretrained(directory)


def t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over single letters plus a few words, built from a vocabulary in code."""
    # T5's special ids: pad 0, eos 1, unk 2, as T5Config's defaults expect.
    pieces = list(dict.fromkeys(["<pad>", "</s>", "<unk>", "▁", *T5_WORDS, *"abcdefghijklmnopqrstuvwxyz",
                                 *(f"▁{c}" for c in "aeiou")]))
    return T5Tokenizer(vocab=[(piece, 0.0 if i < 3 else -float(len(piece))) for i, piece in enumerate(pieces)],
                       extra_ids=0)


def _t5(tokenizer, width: int = 32):
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def _text_encoder(tokenizer, hidden: int, projection: bool = False):
    # The eos id must be the tokenizer's: id 2 would switch CLIP to its legacy argmax pooling.
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _vae(width: int, **extra):
    return AutoencoderKL(
        block_out_channels=(width, width), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=width // 4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        **extra,
    ).eval()


def _unet(width: int, **extra):
    """A two-level conditional UNet on 8x8 latents with 32-wide cross-attention, plus `extra` config."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=width // 4, **extra,
    ).eval()


def sd_components(directory: Path, width: int = 8, seed: int = 0) -> dict:
    """Components of a tiny SD 1.x-style pipeline (text width 32, UNet channels (width, 2*width), 8x8 latents)."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    return dict(unet=_unet(width), vae=_vae(8), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer,
                scheduler=PNDMScheduler(skip_prk_steps=True, **SD_SCHEDULER), safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def sdxl_components(directory: Path, width: int = 8, seed: int = 0) -> dict:
    """Components of a tiny SDXL-style pipeline: two text encoders (16 + 16 wide), text_time micro-conditioning."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    unet = _unet(width, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 16)
    return dict(unet=unet, vae=_vae(8), text_encoder=_text_encoder(tokenizer, 16), tokenizer=tokenizer,
                text_encoder_2=_text_encoder(tokenizer, 16, projection=True), tokenizer_2=tokenizer,
                scheduler=EulerAncestralDiscreteScheduler(**SD_SCHEDULER), image_encoder=None, feature_extractor=None,
                force_zeros_for_empty_prompt=True, add_watermarker=False)


def sd3_components(directory: Path, seed: int = 0) -> dict:
    """Components of a tiny SD3-style pipeline: two CLIPs (16 + 16 wide) and a T5 (32), a one-layer MMDiT on 8x8
    latents in 2x2 patches, a VAE with a shift factor, SD3's shifted flow-matching schedule."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    t5 = t5_tokenizer()
    # The CLIPs' hidden states, side by side (16 + 16), are padded to T5's width, 32: the joint attention's input.
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    ).eval()
    return dict(transformer=transformer, vae=_vae(8, shift_factor=0.1, scaling_factor=1.5),
                text_encoder=_text_encoder(tokenizer, 16, projection=True), tokenizer=tokenizer,
                text_encoder_2=_text_encoder(tokenizer, 16, projection=True), tokenizer_2=tokenizer,
                text_encoder_3=_t5(t5), tokenizer_3=t5, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                image_encoder=None, feature_extractor=None)


def flux_components(directory: Path, guidance_embeds: bool = True, seed: int = 0) -> dict:
    """Components of a tiny Flux pipeline: CLIP (16, pooled) and T5 (32), a one-double- one-single-block transformer
    on 2x2-packed 4-channel latents; Flux-dev (`guidance_embeds`, dynamic shifting) or Flux-schnell (neither)."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()
    schedule = FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER
    return dict(transformer=transformer, vae=_vae(8, shift_factor=0.1, scaling_factor=1.5),
                text_encoder=_text_encoder(tokenizer, 16), tokenizer=tokenizer, text_encoder_2=_t5(t5), tokenizer_2=t5,
                scheduler=FlowMatchEulerDiscreteScheduler(**schedule), image_encoder=None, feature_extractor=None)
