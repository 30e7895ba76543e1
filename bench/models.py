"""Tiny random-init Hugging Face VLMs built from configs (no downloads): one registry for the
tests (tests/hf_models.py re-exports these makers next to its batches and checks) and the
demo (bench/demo.py builds its LLaVA and Qwen2.5-VL here, with its own sizes).

Every maker takes the attention implementation and a seed; `vision=` / `text=` override the
family's tiny vision and text settings, other keywords go to the family's top-level config.
`MAKERS` names them all.
"""

from __future__ import annotations

import torch

IMG, VID, PAD = 999, 998, 0  # image / video placeholder ids, padding id
V_START, V_END = 997, 996  # Qwen vision start / end tokens (Gemma 3: begin / end of image)


def text_config(**extra) -> dict:
    """The tiny LMs' settings; `extra` adds or overrides."""
    defaults = dict(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    return {**defaults, **extra}


def build(model_cls, config, attn: str = "sdpa", seed: int = 0):
    """`model_cls(config)` with `attn` attention, its weights drawn after manual_seed(seed)."""
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config)


# ---- LLaVA family ---------------------------------------------------------------------------


def clip_config(**extra):
    from transformers import CLIPVisionConfig

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,  # 4x4 patches per 32 px image (or tile)
    )
    return CLIPVisionConfig(**(kwargs | extra))


def llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(**text_config(**extra))


def _llava_family(family: str, attn: str, vision=None, text=None, seed: int = 0, **extra):
    """A tiny `<family>ForConditionalGeneration`: CLIP tower, Llama LM, image token IMG."""
    import transformers

    ids = dict(image_token_index=IMG, vision_feature_layer=-1)  # every vision layer: a gradient
    config = getattr(transformers, f"{family}Config")(
        vision_config=clip_config(**(vision or {})),
        text_config=llama_config(**(text or {})),
        **(ids | extra),
    )
    return build(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, seed)


def make_llava(attn: str = "sdpa", **extra):
    return _llava_family("Llava", attn, **extra)


ANYRES = dict(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])  # 1x2, 2x1, 2x2 tiles of 32 px


def make_llava_next(attn: str = "sdpa", **extra):
    return _llava_family("LlavaNext", attn, **(ANYRES | extra))


def make_llava_next_video(attn: str = "sdpa", **extra):
    # spatial_pool_stride 2: a frame's 4x4 patches -> 2x2 tokens
    video = dict(video_token_index=VID, spatial_pool_stride=2)
    return _llava_family("LlavaNextVideo", attn, **(video | ANYRES | extra))


def make_llava_onevision(attn: str = "sdpa", **extra):
    onevision = dict(
        video_token_index=VID,
        vision_feature_select_strategy="default",
        vision_aspect_ratio="anyres_max_1",  # crop grids over one tile's tokens are shrunk
    )
    return _llava_family("LlavaOnevision", attn, **(onevision | ANYRES | extra))


# ---- tiled families: InternVL, Gemma 3, SmolVLM / Idefics3 (4x4 tokens a tile) ----------------

_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def make_internvl(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    # 8x8 patches, pixel-shuffled to 4x4 tokens
    vision = _VISION | dict(image_size=[32, 32], patch_size=[4, 4]) | (vision or {})
    text = text_config(**({"model_type": "qwen2"} | (text or {})))
    ids = dict(image_token_id=IMG)
    config = InternVLConfig(vision_config=vision, text_config=text, **(ids | extra))
    return build(InternVLForConditionalGeneration, config, attn, seed)


def make_gemma3(attn: str = "eager", vision=None, text=None, seed: int = 0, **extra):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    siglip = dict(model_type="siglip_vision_model", image_size=32, patch_size=4)
    vision = _VISION | siglip | (vision or {})
    gemma = dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=32)
    text = text_config(**(gemma | (text or {})))
    ids = dict(
        mm_tokens_per_image=16,  # 8x8 patches average-pooled to 4x4
        image_token_index=IMG,
        boi_token_index=V_START,
        eoi_token_index=V_END,
    )
    config = Gemma3Config(vision_config=vision, text_config=text, **(ids | extra))
    return build(Gemma3ForConditionalGeneration, config, attn, seed)


def make_smolvlm(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    return _idefics3_family("SmolVLM", attn, vision, text, seed, **extra)


def make_idefics3(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    return _idefics3_family("Idefics3", attn, vision, text, seed, **extra)


def _idefics3_family(family: str, attn: str, vision, text, seed: int, **extra):
    import transformers

    # 8x8 patches, pixel-shuffled to 4x4 tokens
    vision = _VISION | dict(image_size=32, patch_size=4) | (vision or {})
    text = text_config(**({"model_type": "llama"} | (text or {})))
    ids = dict(scale_factor=2, image_token_id=IMG)
    config = getattr(transformers, f"{family}Config")(
        vision_config=vision, text_config=text, **(ids | extra)
    )
    return build(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, seed)


# ---- Mllama (cross-attention) -----------------------------------------------------------------


def make_mllama(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    tower = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=4,
        intermediate_size=64,
        vision_output_dim=64,  # hidden_size * (1 + len(intermediate_layers_indices))
        intermediate_layers_indices=[0],
        image_size=16,
        patch_size=8,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    cross = dict(cross_attention_layers=[1], rope_parameters={"rope_type": "default"})
    config = MllamaConfig(
        vision_config=tower | (vision or {}),
        text_config=text_config(**(cross | (text or {}))),
        **({"image_token_index": IMG} | extra),
    )
    return build(MllamaForConditionalGeneration, config, attn, seed)


# ---- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------

_QWEN_VISION = dict(
    depth=2,
    num_heads=4,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
QWEN_IDS = dict(
    image_token_id=IMG,
    video_token_id=VID,
    vision_start_token_id=V_START,
    vision_end_token_id=V_END,
)


def _qwen(family: str, vision: dict, text: dict, attn: str, seed: int, **extra):
    """A tiny `<family>ForConditionalGeneration` (Qwen2VL, Qwen2_5_VL, Qwen3VL, Qwen3VLMoe):
    `vision` over the shared tower settings, `text` over the tiny LM's with M-RoPE."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vision_config=_QWEN_VISION | vision,
        text_config=text_config(**({"rope_parameters": MROPE} | text)),
        **(QWEN_IDS | extra),
    )
    return build(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, seed)


def make_qwen2_vl(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    tower = dict(embed_dim=64, hidden_size=128)
    return _qwen("Qwen2VL", tower | (vision or {}), text or {}, attn, seed, **extra)


def make_qwen2_5_vl(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    tower = dict(
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        window_size=16,  # 2x2 merged patches per attention window
        fullatt_block_indexes=[1],
    )
    return _qwen("Qwen2_5_VL", tower | (vision or {}), text or {}, attn, seed, **extra)


def make_qwen3_vl(
    attn: str = "sdpa", moe: bool = False, vision=None, text=None, seed: int = 0, **extra
):
    tower = dict(
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],  # vision layer 0 feeds LM layer 0
    )
    lm = dict(head_dim=32, rope_parameters=MROPE | {"mrope_interleaved": True})
    if moe:
        lm |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    family = "Qwen3VLMoe" if moe else "Qwen3VL"
    return _qwen(family, tower | (vision or {}), lm | (text or {}), attn, seed, **extra)


MAKERS = {
    "llava": make_llava,
    "llava_next": make_llava_next,
    "llava_next_video": make_llava_next_video,
    "llava_onevision": make_llava_onevision,
    "qwen2_vl": make_qwen2_vl,
    "qwen2_5_vl": make_qwen2_5_vl,
    "qwen3_vl": make_qwen3_vl,
    "qwen3_vl_moe": lambda attn="sdpa", **kw: make_qwen3_vl(attn, moe=True, **kw),
    "internvl": make_internvl,
    "gemma3": make_gemma3,
    "smolvlm": make_smolvlm,
    "idefics3": make_idefics3,
    "mllama": make_mllama,
}


# ---- issue 18, group B: GLM-4V(-MoE), LLaVA-OneVision-1.5, LFM2-VL, Ovis2, Gemma 3n, Llama 4 ----

GLM_VIDEO_START, GLM_VIDEO_END = 995, 994  # <|begin_of_video|> / <|end_of_video|>


def make_glm4v(
    attn: str = "sdpa", moe: bool = False, vision=None, text=None, seed: int = 0, **extra
):
    """A tiny GLM-4.1V (GLM-4.5V with `moe`): Qwen-style tower (4 px patches, 2x2 merge), a
    GLM LM with partial-rotary M-RoPE; the begin / end of image tokens are V_START / V_END."""
    import transformers

    tower = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        image_size=16,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=128,
    )
    rope = MROPE | {"partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3]}
    lm = dict(rope_parameters=rope)
    if moe:
        lm |= dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    ids = dict(
        image_token_id=IMG,
        video_token_id=VID,
        image_start_token_id=V_START,
        image_end_token_id=V_END,
        video_start_token_id=GLM_VIDEO_START,
        video_end_token_id=GLM_VIDEO_END,
    )
    family = "Glm4vMoe" if moe else "Glm4v"
    config = getattr(transformers, f"{family}Config")(
        vision_config=tower | (vision or {}),
        text_config=text_config(**(lm | (text or {}))),
        **(ids | extra),
    )
    return build(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, seed)


def make_llava_onevision1_5(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny LLaVA-OneVision-1.5: Qwen-style tower without temporal patches (4 px patches, 2x2
    merge), a Qwen3 LM with 1-D positions."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    tower = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        out_hidden_size=128,
    )
    lm = text_config(**({"model_type": "qwen3", "head_dim": 32} | (text or {})))
    config = LlavaOnevision15Config(
        vision_config=tower | (vision or {}), text_config=lm, **(QWEN_IDS | extra)
    )
    return build(LlavaOnevision15ForConditionalGeneration, config, attn, seed)


def make_lfm2_vl(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny LFM2-VL: SigLIP2 NaFlex tower (4 px patches, up to 64 an entry), pixel unshuffle 2,
    an LFM2 LM alternating short-convolution and attention layers."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    tower = _VISION | dict(model_type="siglip2_vision_model", patch_size=4, num_patches=64)
    lm = dict(model_type="lfm2", layer_types=["conv", "full_attention"] * 2)
    ids = dict(image_token_id=IMG, projector_hidden_size=64, downsample_factor=2)
    config = Lfm2VlConfig(
        vision_config=tower | (vision or {}),
        text_config=text_config(**(lm | (text or {}))),
        **(ids | extra),
    )
    return build(Lfm2VlForConditionalGeneration, config, attn, seed)


# Ovis2's indicator tokens: <IMG_START>, <IMG_GRID>, <IMG_COL>, <IMG_ROW>, <IMG_END>
OVIS_INDICATORS = [990, 989, 988, 987, 986]


def make_ovis2(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny Ovis2: 8x8 patches a tile, hidden stride 2 (4x4 tokens), a 256-entry visual
    vocabulary, a Qwen2 LM."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    tower = _VISION | dict(image_size=32, patch_size=4, hidden_stride=2, vocab_size=256)
    ids = dict(image_token_id=IMG, visual_indicator_token_ids=OVIS_INDICATORS, hidden_size=128)
    config = Ovis2Config(
        vision_config=tower | (vision or {}),
        text_config=text_config(**({"model_type": "qwen2"} | (text or {}))),
        **(ids | extra),
    )
    return build(Ovis2ForConditionalGeneration, config, attn, seed)


# the convention fallback (adapters/generic.py) serves these two: no adapter file of their own


def make_deepseek_vl(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny DeepSeek-VL: SigLIP tower (4x4 patches of 8 px), Llama LM."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

    tower = _VISION | dict(model_type="siglip_vision_model", image_size=32, patch_size=8)
    config = DeepseekVLConfig(
        vision_config=tower | (vision or {}),
        text_config=text_config(**({"model_type": "llama"} | (text or {}))),
        **({"image_token_id": IMG} | extra),
    )
    return build(DeepseekVLForConditionalGeneration, config, attn, seed)


def make_got_ocr2(attn: str = "eager", vision=None, text=None, seed: int = 0, **extra):
    """A tiny GOT-OCR2 (eager: its SAM tower has no SDPA): 8x8 patches of 16 px, the
    projector's convolutions down to 2x2 tokens an image, Qwen2 LM."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration

    tower = dict(
        hidden_size=32,
        output_channels=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=128,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1],
        mlp_dim=64,
    )
    config = GotOcr2Config(
        vision_config=tower | (vision or {}),
        text_config=text_config(**({"model_type": "qwen2"} | (text or {}))),
        **({"image_token_index": IMG} | extra),
    )
    return build(GotOcr2ForConditionalGeneration, config, attn, seed)


MAKERS.update(
    {
        "deepseek_vl": make_deepseek_vl,
        "got_ocr2": make_got_ocr2,
        "ovis2": make_ovis2,
        "lfm2_vl": make_lfm2_vl,
        "llava_onevision1_5": make_llava_onevision1_5,
        "glm4v": make_glm4v,
        "glm4v_moe": lambda attn="sdpa", **kw: make_glm4v(attn, moe=True, **kw),
    }
)
# ---- end of issue 18, group B ----


# ---- issue 18, group A: Pixtral layouts, VipLlava, Aya Vision, Cohere2-Vision, FastVLM,
# PerceptionLM, PaliGemma --------------------------------------------------------------------

_PIXTRAL = _VISION | dict(model_type="pixtral", image_size=64, patch_size=4)


def make_mistral3(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny Mistral 3: Pixtral tower (4 px patches), 2x2 patch merger (8 px a token),
    Mistral LM; image sizes vary (`image_sizes`)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        vision_config=_PIXTRAL | (vision or {}),
        text_config=text_config(**({"model_type": "mistral"} | (text or {}))),
        **(dict(image_token_index=IMG, spatial_merge_size=2) | extra),
    )
    return build(Mistral3ForConditionalGeneration, config, attn, seed)


def make_llava_pixtral(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny LLaVA with a Pixtral tower (8 px patches, no class token: strategy "full")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    ids = dict(
        image_token_index=IMG, vision_feature_select_strategy="full", vision_feature_layer=-1
    )
    config = LlavaConfig(
        vision_config=_PIXTRAL | dict(patch_size=8) | (vision or {}),
        text_config=text_config(**({"model_type": "llama"} | (text or {}))),
        **(ids | extra),
    )
    return build(LlavaForConditionalGeneration, config, attn, seed)


MAKERS.update({"mistral3": make_mistral3, "llava_pixtral": make_llava_pixtral})


_SIGLIP = _VISION | dict(model_type="siglip_vision_model", image_size=32, patch_size=4)


def make_vipllava(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny VipLlava: CLIP tower (4x4 patches), features of its last two layers."""
    layers = {"vision_feature_layer": [-1, -2]}
    return _llava_family("VipLlava", attn, vision, text, seed, **(layers | extra))


def _cohere_family(family: str, attn: str, vision, text, seed: int, **extra):
    """A tiny Aya Vision / Cohere2-Vision: SigLIP tower (8x8 patches, pixel-shuffled to 4x4
    tokens a tile), Cohere2 LM with sliding-window layers."""
    import transformers

    lm = dict(model_type="cohere2", head_dim=32, sliding_window=8)
    ids = dict(downsample_factor=2, alignment_intermediate_size=128)
    ids["image_token_index" if family == "AyaVision" else "image_token_id"] = IMG
    config = getattr(transformers, f"{family}Config")(
        vision_config=_SIGLIP | (vision or {}),
        text_config=text_config(**(lm | (text or {}))),
        **(ids | extra),
    )
    return build(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, seed)


def make_aya_vision(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    return _cohere_family("AyaVision", attn, vision, text, seed, **extra)


def make_cohere2_vision(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    return _cohere_family("Cohere2Vision", attn, vision, text, seed, **extra)


def make_paligemma(attn: str = "eager", vision=None, text=None, seed: int = 0, **extra):
    """A tiny PaliGemma: SigLIP tower (8 px patches: 4x4 tokens an image), Gemma LM."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=_SIGLIP | dict(patch_size=8) | (vision or {}),
        text_config=text_config(**({"model_type": "gemma", "head_dim": 32} | (text or {}))),
        **(dict(image_token_index=IMG, projection_dim=128, hidden_size=128) | extra),
    )
    return build(PaliGemmaForConditionalGeneration, config, attn, seed)


MAKERS.update(
    {
        "vipllava": make_vipllava,
        "aya_vision": make_aya_vision,
        "cohere2_vision": make_cohere2_vision,
        "paligemma": make_paligemma,
    }
)


def make_fast_vlm(attn: str = "eager", vision=None, text=None, seed: int = 0, **extra):
    """A tiny FastVLM. Its released tower (FastViTHD) is timm's; here a 2-stage ConvNeXt of
    transformers gives the same kind of output, a `[B, C, 4, 4]` map (eager: ConvNeXt has no
    SDPA)."""
    from transformers import ConvNextConfig, FastVlmConfig, FastVlmForConditionalGeneration

    tower = dict(patch_size=4, num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], image_size=32)
    vision_config = ConvNextConfig(**(tower | (vision or {})))
    vision_config.hidden_size = vision_config.hidden_sizes[-1]  # what the projector reads
    config = FastVlmConfig(
        vision_config=vision_config,
        text_config=text_config(**({"model_type": "qwen2"} | (text or {}))),
        **(dict(image_token_index=IMG, image_seq_length=16) | extra),
    )
    return build(FastVlmForConditionalGeneration, config, attn, seed)


def make_perception_lm(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny PerceptionLM. Its released tower is timm's Perception Encoder; here a CLIP tower
    (8x8 patches and a class token, as the PE ViT) stands in, the projector pooling 2x2 to 4x4
    tokens a tile."""
    from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration

    vision_config = clip_config(**({"patch_size": 4} | (vision or {})))
    vision_config.model_args = {"embed_dim": vision_config.hidden_size}  # the projector reads it
    ids = dict(image_token_id=IMG, video_token_id=VID, projector_pooling_ratio=2)
    config = PerceptionLMConfig(
        vision_config=vision_config,
        text_config=text_config(**({"model_type": "llama"} | (text or {}))),
        **(ids | extra),
    )
    return build(PerceptionLMForConditionalGeneration, config, attn, seed)


MAKERS.update({"fast_vlm": make_fast_vlm, "perception_lm": make_perception_lm})


# ---- issue 18, group C: Llama 4, Janus, Idefics2 ---------------------------------------------


def make_llama4(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny Llama 4: 8x8 patches of 4 px a tile, pixel-shuffled (ratio 0.5) to 4x4 tokens;
    a Llama 4 LM of 4 layers (chunked attention in chunks of 8 tokens on layers 0-2, full
    NoPE attention on layer 3; 4-expert MoE on layers 1 and 3). The begin / end of image
    tokens are V_START / V_END, the `<|patch|>` placeholder IMG."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 1e4}
    tower = _VISION | dict(
        intermediate_size=256,  # the pixel-shuffled width (64 / 0.5^2) the adapter MLP reads
        image_size=32,
        patch_size=4,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=64,
        projector_input_dim=64,
        projector_output_dim=64,
        rope_parameters=rope,
    )
    lm = dict(
        model_type="llama4_text",
        head_dim=32,
        intermediate_size_mlp=256,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        rope_parameters=rope,
    )
    ids = dict(image_token_index=IMG, boi_token_index=V_START, eoi_token_index=V_END)
    config = Llama4Config(
        vision_config=tower | (vision or {}),
        text_config=text_config(**(lm | (text or {}))),
        **(ids | extra),
    )
    return build(Llama4ForConditionalGeneration, config, attn, seed)


MAKERS.update({"llama4": make_llama4})


def make_janus(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny Janus: SigLIP-style tower (4x4 patches of 8 px, 16 tokens an image), Llama LM,
    a small VQ-VAE (built by the model for image generation; unused here)."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    tower = _VISION | dict(image_size=32, patch_size=8, projection_dim=128, num_image_tokens=16)
    vq = dict(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,  # GroupNorm's 32 groups
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        num_patches=4,
        projection_dim=128,
        image_token_embed_dim=128,
    )
    config = JanusConfig(
        vision_config=tower | (vision or {}),
        vq_config=vq,
        text_config=text_config(**({"model_type": "llama"} | (text or {}))),
        **({"image_token_id": IMG} | extra),
    )
    return build(JanusForConditionalGeneration, config, attn, seed)


def make_idefics2(attn: str = "sdpa", vision=None, text=None, seed: int = 0, **extra):
    """A tiny Idefics2: SigLIP tower (8x8 patches of 4 px), a perceiver resampling them into 16
    latents an image, Mistral LM."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    perceiver = dict(
        hidden_size=128,
        resampler_n_latents=16,
        resampler_depth=1,
        resampler_n_heads=4,
        resampler_head_dim=32,
        num_key_value_heads=2,
    )
    config = Idefics2Config(
        vision_config=_VISION | dict(image_size=32, patch_size=4) | (vision or {}),
        perceiver_config=perceiver,
        text_config=text_config(**({"model_type": "mistral"} | (text or {}))),
        **({"image_token_id": IMG} | extra),
    )
    return build(Idefics2ForConditionalGeneration, config, attn, seed)


MAKERS.update({"janus": make_janus, "idefics2": make_idefics2})
