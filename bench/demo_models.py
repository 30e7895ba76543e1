"""The demo's model families (`python -m bench --model NAME`): one `Family` a name, built from the
tests' tiny makers (bench/models.py) at the demo's `ModelSize` with the task's vocabulary and
image, and a function that lays a task batch (bench/task.py: `[BOS] [IMG] * n` then the
questions) out as the family's processor would. Every family feeds the LM `task.image_tokens`
visual tokens per image on a (image_size / patch_size)^2 grid, so the VTC's 2x2 pool and the FLOP
ratios mean the same thing across families; its towers with a 2x2 merge / pixel shuffle / pool
take patches of half the task's patch size.

Layouts (n = task.image_tokens, g = sqrt(n); markers are labelled -100, answers keep theirs):

    llava, vipllava          [BOS] [IMG]*n ...                            (the task batch as is)
    perception_lm            [BOS] [IMG]*n ...                     pixels [B, 1 tile, 3, H, W]
    qwen2_vl, qwen2_5_vl,    [BOS] [V_START] [IMG]*n [V_END] ...   flat processor patches,
    qwen3_vl, qwen3_vl_moe                                           image_grid_thw, mm types
    gemma3                   [BOS] [BOI] [IMG]*n [EOI] ...         token_type_ids on the image
    internvl                 [BOS] [<img>] [IMG]*n [</img>] ...
    janus                    [BOS] [<begin_of_image>] [IMG]*n [<end_of_image>] ...
    mistral3, llava_pixtral  [BOS] ([IMG]*g [IMG_BREAK])*(g-1) [IMG]*g [IMG_END] ...  image_sizes
    aya_vision               [BOS] [START_OF_IMG] [TILE_GLOBAL] [IMG]*n [END_OF_IMG] ...
    cohere2_vision           [BOS] [START_OF_IMG] [IMG]*n [IMG_LINE_BREAK] [END_OF_IMG] ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import models
from .task import IMAGE, VOCAB_SIZE

if TYPE_CHECKING:
    from .demo import ModelSize
    from .task import TaskConfig

# marker ids inside the task's vocabulary (unused by it)
BREAK, START, END, PLACEHOLDER, VIDEO = 59, 60, 61, 62, 63
TILE = 58  # Aya Vision's TILE_GLOBAL (Cohere2-Vision's IMG_LINE_BREAK: BREAK)


def text_settings(size: ModelSize, task: TaskConfig, **extra) -> dict:
    """The LM at `size` with the task's vocabulary (`extra` adds or overrides)."""
    return (
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=size.text_hidden,
            intermediate_size=size.text_intermediate,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=max(1024, task.seq_len + 2),
            eos_token_id=3,
        )
        | extra
    )


def vision_settings(size: ModelSize, **extra) -> dict:
    return dict(hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate) | extra


def mrope(size: ModelSize, **extra) -> dict:
    """M-RoPE sections (t, h, w): 2:3:3 of the head_dim / 2 frequencies."""
    eighth = size.text_hidden // size.heads // 16
    sections = [2 * eighth] + [3 * eighth] * 2
    return {"rope_type": "default", "rope_theta": 1e4, "mrope_section": sections} | extra


# ---- builders: (size, task, seed) -> model -------------------------------------------------


def build_llava(size, task, seed, make=models.make_llava):
    """CLIP tower at the task's patch (every vision layer trained), Llama LM; image token 2."""
    vision = vision_settings(
        size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.heads,
        image_size=task.image_size,
        patch_size=task.patch_size,
    )
    return make(vision=vision, text=text_settings(size, task), seed=seed, image_token_index=IMAGE)


QWEN_IDS = dict(
    image_token_id=PLACEHOLDER,
    video_token_id=VIDEO,
    vision_start_token_id=START,
    vision_end_token_id=END,
)


def _qwen_tower(size, task) -> dict:
    return dict(depth=size.vision_layers, num_heads=size.heads, patch_size=task.patch_size // 2)


def build_qwen2_vl(size, task, seed):
    vision = _qwen_tower(size, task) | dict(
        embed_dim=size.vision_hidden, hidden_size=size.text_hidden
    )
    text = text_settings(size, task, rope_parameters=mrope(size))
    return models.make_qwen2_vl(vision=vision, text=text, seed=seed, **QWEN_IDS)


def build_qwen2_5_vl(size, task, seed):
    vision = _qwen_tower(size, task) | vision_settings(
        size,
        out_hidden_size=size.text_hidden,
        window_size=4 * task.patch_size,  # 4x4 merged tokens per attention window
        fullatt_block_indexes=[size.vision_layers - 1],
    )
    text = text_settings(size, task, rope_parameters=mrope(size))
    return models.make_qwen2_5_vl(vision=vision, text=text, seed=seed, **QWEN_IDS)


def build_qwen3_vl(size, task, seed, moe: bool = False):
    """Qwen3-VL's quirks: learned position embeddings (a square grid, interpolated to the
    image's), deepstack (vision layer 0 feeds LM layer 0), explicit head_dim, interleaved
    M-RoPE; the MoE variant's experts at half the dense MLP."""
    vision = _qwen_tower(size, task) | vision_settings(
        size,
        out_hidden_size=size.text_hidden,
        num_position_embeddings=(task.image_size // (task.patch_size // 2)) ** 2,
        deepstack_visual_indexes=[0],
    )
    head_dim = size.text_hidden // size.heads
    text = text_settings(
        size, task, head_dim=head_dim, rope_parameters=mrope(size, mrope_interleaved=True)
    )
    if moe:
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=size.text_hidden)
    return models.make_qwen3_vl(moe=moe, vision=vision, text=text, seed=seed, **QWEN_IDS)


def _tower(size, task, **extra) -> dict:
    """A ViT at half the task's patch (the family merges / shuffles / pools 2x2 back to it)."""
    return (
        vision_settings(
            size,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads,
            image_size=task.image_size,
            patch_size=task.patch_size // 2,
        )
        | extra
    )


def build_gemma3(size, task, seed):
    """SigLIP tower at half the patch, its (2g)^2 patches average-pooled to mm_tokens_per_image
    = n; sliding window over the whole sequence (the questions see the image in every layer)."""
    head_dim = size.text_hidden // size.heads
    text = text_settings(
        size,
        task,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=task.seq_len + 4,
    )
    return models.make_gemma3(
        attn="sdpa",
        vision=_tower(size, task),
        text=text,
        seed=seed,
        mm_tokens_per_image=task.image_tokens,
        image_token_index=PLACEHOLDER,
        boi_token_index=START,
        eoi_token_index=END,
    )


def build_internvl(size, task, seed):
    """InternViT at half the patch, pixel-shuffled 2x2 (downsample 0.5); Qwen2 LM."""
    h = task.image_size
    p = task.patch_size // 2
    vision = _tower(size, task, image_size=[h, h], patch_size=[p, p])
    text = text_settings(size, task)
    return models.make_internvl(vision=vision, text=text, seed=seed, image_token_id=PLACEHOLDER)


def build_mistral3(size, task, seed):
    """Pixtral tower at half the patch, 2x2 patch merger; Mistral LM."""
    return models.make_mistral3(
        vision=_tower(size, task, head_dim=size.vision_hidden // size.heads),
        text=text_settings(size, task),
        seed=seed,
        image_token_index=PLACEHOLDER,
    )


def build_cohere(size, task, seed, make=models.make_aya_vision, id_key="image_token_index"):
    """Aya Vision / Cohere2-Vision: SigLIP tower at half the patch, pixel-shuffled 2x2; Cohere2
    LM (sliding window: the whole sequence)."""
    text = text_settings(
        size, task, head_dim=size.text_hidden // size.heads, sliding_window=task.seq_len + 4
    )
    return make(vision=_tower(size, task), text=text, seed=seed, **{id_key: PLACEHOLDER})


def build_llava_pixtral(size, task, seed):
    """LLaVA with a Pixtral tower at the task's patch (no class token), Llama LM."""
    vision = _tower(
        size, task, patch_size=task.patch_size, head_dim=size.vision_hidden // size.heads
    )
    return models.make_llava_pixtral(
        vision=vision, text=text_settings(size, task), seed=seed, image_token_index=PLACEHOLDER
    )


def build_janus(size, task, seed):
    """Janus: SigLIP-style tower at the task's patch, n tokens an image (its VQ-VAE, for image
    generation, is built and unused)."""
    vision = _tower(
        size,
        task,
        patch_size=task.patch_size,
        projection_dim=size.text_hidden,
        num_image_tokens=task.image_tokens,
    )
    return models.make_janus(
        vision=vision, text=text_settings(size, task), seed=seed, image_token_id=PLACEHOLDER
    )


def build_perception_lm(size, task, seed):
    """PerceptionLM: a CLIP tower at half the patch (its released Perception Encoder is timm's),
    the projector pooling 2x2."""
    vision = _tower(size, task)
    return models.make_perception_lm(
        vision=vision, text=text_settings(size, task), seed=seed, image_token_id=PLACEHOLDER
    )


# ---- layouts: (the task batch's model inputs, task) -> the family's forward arguments -----------


def relayout(inputs: dict, task: TaskConfig, run: list[int]) -> dict:
    """The batch with each row's n image placeholders (after BOS) replaced by `run`; labels -100
    over the run (the placeholders were -100 already), the answers where they were."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    b, n = ids.shape[0], task.image_tokens
    block = torch.tensor(run, dtype=ids.dtype, device=ids.device).expand(b, -1)
    ids = torch.cat([ids[:, :1], block, ids[:, 1 + n :]], 1)
    labels = torch.cat([labels[:, :1], torch.full_like(block, -100), labels[:, 1 + n :]], 1)
    return inputs | {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def framed(start: list[int], end: list[int]) -> Callable:
    """The image run between `start` and `end` markers."""

    def layout(inputs: dict, task: TaskConfig) -> dict:
        return relayout(inputs, task, start + [PLACEHOLDER] * task.image_tokens + end)

    return layout


def qwen_inputs(inputs: dict, task: TaskConfig) -> dict:
    """The image's placeholders between vision start / end tokens, and the pixels cut into the
    processor's flat patches (each image repeated over the 2-frame temporal patch)."""
    out = framed([START], [END])(inputs, task)
    pixels = out["pixel_values"]
    b, c = pixels.shape[:2]
    p, m = task.patch_size // 2, 2
    gh = gw = task.image_size // p
    x = pixels[:, None].expand(b, 2, c, *pixels.shape[2:])  # [B, tp, C, H, W]
    x = x.reshape(b, 2, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # the processor's patch order
    ids = out["input_ids"]
    return out | {
        "mm_token_type_ids": (ids == PLACEHOLDER).long(),
        "pixel_values": x.reshape(b * gh * gw, c * 2 * p * p),
        "image_grid_thw": torch.tensor([[1, gh, gw]] * b, device=ids.device),
    }


def gemma3_inputs(inputs: dict, task: TaskConfig) -> dict:
    out = framed([START], [END])(inputs, task)
    return out | {"token_type_ids": (out["input_ids"] == PLACEHOLDER).long()}


def pixtral_inputs(inputs: dict, task: TaskConfig) -> dict:
    """The Pixtral processor's block: [IMG_BREAK] after every row of g tokens, [IMG_END] after
    the last; `image_sizes` (every image the task's square)."""
    g = task.image_size // task.patch_size
    block = ([PLACEHOLDER] * g + [BREAK]) * g
    block[-1] = END
    out = relayout(inputs, task, block)
    sizes = [[task.image_size] * 2] * out["input_ids"].shape[0]
    return out | {"image_sizes": torch.tensor(sizes, device=out["input_ids"].device)}


def tiled_inputs(inputs: dict, task: TaskConfig) -> dict:
    """PerceptionLM: one run of placeholders, pixels [images, tiles = 1, 3, H, W]."""
    out = framed([], [])(inputs, task)
    return out | {"pixel_values": out["pixel_values"][:, None]}


def unchanged(inputs: dict, task: TaskConfig) -> dict:
    return inputs


# ---- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    title: str  # the demo's title: "<title> (<tower> ..., <lm> ...)"
    tower: str
    lm: str
    build: Callable  # (ModelSize, TaskConfig, seed) -> model (random init, SDPA)
    inputs: Callable  # (task batch's model_inputs(), TaskConfig) -> forward arguments


FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA", "CLIP", "Llama", build_llava, unchanged),
    "vipllava": Family(
        "VipLlava",
        "CLIP",
        "Llama",
        lambda size, task, seed: build_llava(size, task, seed, make=models.make_vipllava),
        unchanged,
    ),
    "qwen2_vl": Family("Qwen2-VL", "ViT", "Qwen2", build_qwen2_vl, qwen_inputs),
    "qwen2_5_vl": Family("Qwen2.5-VL", "ViT", "Qwen2", build_qwen2_5_vl, qwen_inputs),
    "qwen3_vl": Family("Qwen3-VL", "ViT", "Qwen3", build_qwen3_vl, qwen_inputs),
    "qwen3_vl_moe": Family(
        "Qwen3-VL-MoE",
        "ViT",
        "Qwen3-MoE",
        lambda size, task, seed: build_qwen3_vl(size, task, seed, moe=True),
        qwen_inputs,
    ),
    "gemma3": Family("Gemma 3", "SigLIP", "Gemma3", build_gemma3, gemma3_inputs),
    "internvl": Family("InternVL", "InternViT", "Qwen2", build_internvl, framed([START], [END])),
    "mistral3": Family("Mistral 3", "Pixtral", "Mistral", build_mistral3, pixtral_inputs),
    "aya_vision": Family(
        "Aya Vision", "SigLIP", "Cohere2", build_cohere, framed([START, TILE], [END])
    ),
    "cohere2_vision": Family(
        "Cohere2-Vision",
        "SigLIP",
        "Cohere2",
        lambda size, task, seed: build_cohere(
            size, task, seed, models.make_cohere2_vision, "image_token_id"
        ),
        framed([START], [BREAK, END]),
    ),
    "llava_pixtral": Family(
        "LLaVA-Pixtral", "Pixtral", "Llama", build_llava_pixtral, pixtral_inputs
    ),
    "janus": Family("Janus", "SigLIP", "Llama", build_janus, framed([START], [END])),
    "perception_lm": Family("PerceptionLM", "CLIP", "Llama", build_perception_lm, tiled_inputs),
}
