"""Tiny random-init Hugging Face VLMs (no downloads), their batches, and the checks every
family's adapter must pass (tests/hf/test_hf_<family>.py).

`make_qwen2_5_vl()` + `qwen_batch()` also serve as the tiny Qwen2.5-VL for the demo.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMG, VID, PAD = 999, 998, 0
V_START, V_END = 997, 996  # Qwen vision start / end tokens
TOKEN = {"image": IMG, "video": VID}
TYPE_ID = {"image": 1, "video": 2}  # mm_token_type_ids


def _takes_encoder_outputs() -> bool:
    from transformers import LlavaModel

    return "mm_encoder_outputs" in inspect.signature(LlavaModel.forward).parameters


# tests that feed a reference model precomputed features, or stub the feature getters
needs_encoder_outputs = pytest.mark.skipif(
    not _takes_encoder_outputs(),
    reason="this transformers has no mm_encoder_outputs (the test's reference path needs it)",
)


def build_ids(rows: list[list], placeholders: dict[str, list[int]], pad_left: bool) -> dict:
    """rows: per sample a list of text token lists and "image" / "video" markers; the k-th
    item of a modality (row-major) gets `placeholders[modality][k]` tokens. Returns input_ids,
    attention_mask, labels (-100 on placeholders and padding) and mm_token_type_ids."""
    seqs, types, seen = [], [], {"image": 0, "video": 0}
    for parts in rows:
        seq, typ = [], []
        for part in parts:
            if isinstance(part, str):
                n = placeholders[part][seen[part]]
                seen[part] += 1
                seq += [TOKEN[part]] * n
                typ += [TYPE_ID[part]] * n
            else:
                seq += part
                typ += [0] * len(part)
        seqs.append(seq)
        types.append(typ)
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD)
    mask, mm = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (seq, typ) in enumerate(zip(seqs, types)):
        cols = slice(length - len(seq), length) if pad_left else slice(0, len(seq))
        ids[i, cols], mask[i, cols], mm[i, cols] = torch.tensor(seq), 1, torch.tensor(typ)
    labels = torch.where((mm != 0) | (mask == 0), -100, ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm}


def _text_config(**extra) -> dict:
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

    return LlamaConfig(**_text_config(**extra))


def _llava_family(family: str, attn: str, **extra):
    """A tiny `<family>ForConditionalGeneration`: CLIP tower, Llama LM, image token IMG."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vision_config=clip_config(),
        text_config=llama_config(),
        image_token_index=IMG,
        vision_feature_layer=-1,  # every vision layer gets a gradient
        **extra,
    )
    return _finish(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn)


def make_llava(attn: str = "sdpa", **extra):
    return _llava_family("Llava", attn, **extra)


# several images in a row, one image, text only
LLAVA_ROWS = [[[5, 6], "image", [7], "image", [8, 9]], [[10], "image", [11, 12]], [[14, 15, 16]]]


def llava_batch(pad_left: bool, images: int = 3, rows=LLAVA_ROWS, tokens: int = 16) -> dict:
    batch = build_ids(rows, {"image": [tokens] * images}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    batch["pixel_values"] = torch.randn(images, 3, 32, 32, generator=gen)
    return batch


ANYRES = dict(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])  # 1x2, 2x1, 2x2 tiles of 32 px


def make_llava_next(attn: str = "sdpa"):
    return _llava_family("LlavaNext", attn, **ANYRES)


# original (H, W) of each image: 1x2 tiles, 2x1 tiles, 2x2 tiles unpadded to a 6x8 crop grid
LLAVA_NEXT_SIZES = [(32, 64), (64, 32), (48, 64)]


def llava_next_batch(
    model,
    pad_left: bool,
    sizes=LLAVA_NEXT_SIZES,
    rows=LLAVA_ROWS,
    videos: int = 0,
    video_tokens: int = 0,
    **extra,
) -> dict:
    """Anyres images (placeholder counts: the packed lengths the model computes, given the
    `extra` inputs, e.g. batch_num_images) and `videos` videos of 4 frames, `video_tokens`
    placeholders each."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(sizes), 5, 3, 32, 32, generator=gen)  # base + up to 4 tiles
    image_sizes = torch.tensor(sizes)
    extra |= {"pixel_values": pixels, "image_sizes": image_sizes}
    with torch.no_grad():
        image_kw = {k: v for k, v in extra.items() if k not in ("pixel_values", "image_sizes")}
        feats = model.model.get_image_features(pixels, image_sizes, return_dict=True, **image_kw)
        placeholders = {"image": [f.shape[0] for f in feats.pooler_output]}
    if videos:
        extra["pixel_values_videos"] = torch.randn(videos, 4, 3, 32, 32, generator=gen)
        placeholders["video"] = [video_tokens] * videos
    batch = build_ids(rows, placeholders, pad_left)
    del batch["mm_token_type_ids"]
    return batch | extra


def make_llava_next_video(attn: str = "sdpa"):
    # spatial_pool_stride 2: a frame's 4x4 patches -> 2x2 tokens
    return _llava_family(
        "LlavaNextVideo", attn, video_token_index=VID, spatial_pool_stride=2, **ANYRES
    )


# an image row, a video row, an image + video row, text only
LLAVA_VIDEO_ROWS = [
    [[5], "image", [6, 7]],
    [[8], "video", [9]],
    [[10], "image", [11], "video"],
    [[12, 13, 14]],
]


def llava_next_video_batch(model, pad_left: bool) -> dict:
    # 4 frames of 2x2 pooled tokens a video
    return llava_next_batch(model, pad_left, [(32, 64), (48, 64)], LLAVA_VIDEO_ROWS, 2, 16)


# an anyres image, a video, two base-only images (a multi-image row) and a video, text only
ONEVISION_ROWS = [
    [[5], "image", [6, 7]],
    [[8], "video", [9]],
    [[10], "image", [11], "image", [12], "video"],
    [[13, 14, 15]],
]


def llava_onevision_batch(model, pad_left: bool) -> dict:
    sizes, per_row = [(32, 64), (48, 64), (64, 32)], torch.tensor([1, 0, 2, 0])
    # 4 frames of 2x2 tokens (bilinear from 4x4) and a newline a video
    return llava_next_batch(model, pad_left, sizes, ONEVISION_ROWS, 2, 17, batch_num_images=per_row)


def make_llava_onevision(attn: str = "sdpa"):
    return _llava_family(
        "LlavaOnevision",
        attn,
        video_token_index=VID,
        vision_feature_select_strategy="default",
        vision_aspect_ratio="anyres_max_1",  # crop grids over one tile's tokens are shrunk
        **ANYRES,
    )


def llava_next_reference_pack(packed, newline, crop_grid):
    """One LLaVA-NeXT image, plainly: pool the 4x4 base and the (H, W) crops 2x2, a newline
    after every pooled crop row."""
    from sts_kernels import token_pool

    hc, wc = crop_grid
    base = token_pool(packed[None, :16], (4, 4), (2, 2))[0]
    crops = packed[16:].view(hc, wc + 1, -1)[:, :wc].reshape(1, hc * wc, -1)
    hp, wp = -(-hc // 2), -(-wc // 2)
    crops = token_pool(crops, (hc, wc), (2, 2))[0].view(hp, wp, -1)
    rows = torch.cat([crops, newline.expand(hp, 1, -1)], 1).reshape(-1, packed.shape[-1])
    return torch.cat([base, rows])


# ---- tiled families: InternVL, Gemma 3, SmolVLM -------------------------------------------------
# every tile a 4x4 grid of 16 tokens; rows: two tiles/images, one, text only

TILED_ROWS = [[[5], "image", [6], "image", [7, 8]], [[9, 10], "image", [11]], [[12, 13, 14]]]
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def make_internvl(attn: str = "sdpa"):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = _VISION | dict(image_size=[32, 32], patch_size=[4, 4])  # 8x8 -> shuffled 4x4
    text = _text_config(model_type="qwen2")
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG)
    return _finish(InternVLForConditionalGeneration, config, attn)


def make_gemma3(attn: str = "eager"):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = _VISION | dict(model_type="siglip_vision_model", image_size=32, patch_size=4)
    text = _text_config(head_dim=32, sliding_window=8, query_pre_attn_scalar=32)
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=16,  # 8x8 patches average-pooled to 4x4
        image_token_index=IMG,
        boi_token_index=V_START,
        eoi_token_index=V_END,
    )
    return _finish(Gemma3ForConditionalGeneration, config, attn)


def make_smolvlm(attn: str = "sdpa", family: str = "SmolVLM"):
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForConditionalGeneration")
    vision = _VISION | dict(image_size=32, patch_size=4)  # 8x8 -> shuffled 4x4
    text = _text_config(model_type="llama")
    config = config_cls(vision_config=vision, text_config=text, scale_factor=2, image_token_id=IMG)
    return _finish(model_cls, config, attn)


def make_idefics3(attn: str = "sdpa"):
    return make_smolvlm(attn, family="Idefics3")


def tiled_batch(family: str, pad_left: bool, tokens: int = 16) -> dict:
    """TILED_ROWS for `family` ("internvl", "gemma3", "smolvlm", "idefics3"), `tokens` a tile."""
    batch = build_ids(TILED_ROWS, {"image": [tokens] * 3}, pad_left)
    types = batch.pop("mm_token_type_ids")
    gen = torch.Generator().manual_seed(1)
    if family in ("smolvlm", "idefics3"):  # [B, images, 3, H, W], all-zero images are padding
        pixels = torch.zeros(3, 2, 3, 32, 32)
        pixels[0] = torch.randn(2, 3, 32, 32, generator=gen)
        pixels[1, 0] = torch.randn(3, 32, 32, generator=gen)
    else:
        pixels = torch.randn(3, 3, 32, 32, generator=gen)
    if family == "gemma3":
        batch["token_type_ids"] = types
    return batch | {"pixel_values": pixels}


def check_tiled_vtc_matches_reference(model, family: str, pad_left: bool) -> None:
    """The patched model (VTC 2x2 pool only) gives the logits of the unpatched model fed
    reference-pooled tiles (token_pool per 4x4 tile) and the batch built with 4 tokens a tile."""
    from sts_kernels import token_pool
    from sts_kernels.integrations.hf import apply_sts

    ref = copy.deepcopy(model)
    batch = tiled_batch(family, pad_left)
    handle = apply_sts(model, compress={"mode": "pool"}, skip=False)
    out = model(**batch)
    getter_args = [batch["pixel_values"]] + ([None] if family in ("smolvlm", "idefics3") else [])
    with torch.no_grad():
        feats = ref.model.get_image_features(*getter_args, return_dict=True)
        pooled = [
            token_pool(f.reshape(-1, 16, f.shape[-1]), (4, 4), (2, 2)) for f in feats.pooler_output
        ]
    if isinstance(feats.pooler_output, torch.Tensor):
        feats.pooler_output = pooled[0] if len(pooled) == 1 else torch.stack(pooled)
    else:
        feats.pooler_output = [p.reshape(-1, p.shape[-1]) for p in pooled]
    shrunk = tiled_batch(family, pad_left, tokens=4)
    del shrunk["pixel_values"]
    expected = ref(**shrunk, mm_encoder_outputs={"image": feats})
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for name, value in shrunk.items():
        assert torch.equal(handle.last_inputs[name], value), name
    assert (handle.report.image_tokens_in, handle.report.image_tokens_kept) == (48, 12)
    handle.remove()


# ---- Mllama (cross-attention) -----------------------------------------------------------------


def make_mllama(attn: str = "sdpa"):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(
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
    text = _text_config(cross_attention_layers=[1], rope_parameters={"rope_type": "default"})
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMG)
    return _finish(MllamaForConditionalGeneration, config, attn)


def mllama_batch(pad_left: bool) -> dict:
    """Rows: one image of 1 tile, one image of 2 tiles, text only (an empty image slot)."""
    rows = [[[5], "image", [6, 7, 8]], [[9, 10], "image", [11]], [[12, 13, 14]]]
    batch = build_ids(rows, {"image": [1, 1]}, pad_left)
    del batch["mm_token_type_ids"]
    b, t = batch["input_ids"].shape
    cross = torch.zeros(b, t, 1, 2, dtype=torch.long)  # [B, T, images, tiles]
    for row, tiles in ((0, 1), (1, 2)):  # text from the image token on sees its tiles
        first = int((batch["input_ids"][row] == IMG).nonzero()[0, 0])
        cross[row, first:, 0, :tiles] = 1
    gen = torch.Generator().manual_seed(1)
    return batch | {
        "pixel_values": torch.randn(b, 1, 2, 3, 16, 16, generator=gen),
        "aspect_ratio_ids": torch.tensor([[1], [2], [1]]),
        "aspect_ratio_mask": torch.tensor([[[1, 0]], [[1, 1]], [[1, 0]]]),
        "cross_attention_mask": cross,
    }


# ---- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------

_QWEN_VISION = dict(
    depth=2,
    num_heads=4,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
_MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
_QWEN_IDS = dict(
    image_token_id=IMG,
    video_token_id=VID,
    vision_start_token_id=V_START,
    vision_end_token_id=V_END,
)


def _finish(model_cls, config, attn: str):
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config)


def make_qwen2_vl(attn: str = "sdpa"):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(_QWEN_VISION, embed_dim=64, hidden_size=128),
        text_config=_text_config(rope_parameters=_MROPE),
        **_QWEN_IDS,
    )
    return _finish(Qwen2VLForConditionalGeneration, config, attn)


def make_qwen2_5_vl(attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        _QWEN_VISION,
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        window_size=16,  # 2x2 merged patches per attention window
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=_text_config(rope_parameters=_MROPE), **_QWEN_IDS
    )
    return _finish(Qwen2_5_VLForConditionalGeneration, config, attn)


def make_qwen3_vl(attn: str = "sdpa", moe: bool = False):
    import transformers

    family = "Qwen3VLMoe" if moe else "Qwen3VL"
    vision = dict(
        _QWEN_VISION,
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],  # vision layer 0 feeds LM layer 0
    )
    rope = _MROPE | {"mrope_interleaved": True}
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64) if moe else {}
    text = _text_config(head_dim=32, rope_parameters=rope, **experts)
    config = getattr(transformers, f"{family}Config")(
        vision_config=vision, text_config=text, **_QWEN_IDS
    )
    return _finish(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn)


# raw-patch grids (t, h, w); merged 2x2 -> 4x4, 2x3 (images) and 4 frames of 2x2 (video)
QWEN_IMAGES = [(1, 8, 8), (1, 4, 6)]
QWEN_VIDEOS = [(4, 4, 4)]
QWEN_ROWS = [
    [[5], [V_START], "image", [V_END], [20, 21]],
    [[6, 7], [V_START], "image", [V_END], [V_START], "video", [V_END], [22]],
    [[8, 9, 10, 11]],  # text only
]


def qwen_batch(
    pad_left: bool, images=QWEN_IMAGES, videos=QWEN_VIDEOS, rows=QWEN_ROWS, frame_runs=False
) -> dict:
    """A batch of images (several in a row), a video and a text-only row. `frame_runs`: every
    video frame is a placeholder run (marker) of its own, as Qwen3-VL lays them out."""
    per_video = [[h * w // 4] * t if frame_runs else [t * h * w // 4] for t, h, w in videos]
    placeholders = {
        "image": [t * h * w // 4 for t, h, w in images],
        "video": [n for runs in per_video for n in runs],
    }
    batch = build_ids(rows, placeholders, pad_left)
    gen = torch.Generator().manual_seed(1)
    patch_dim = 3 * 2 * 4 * 4  # channels * temporal_patch * patch * patch
    for key, grids in (("image", images), ("video", videos)):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            pixels = "pixel_values" if key == "image" else "pixel_values_videos"
            batch[pixels] = torch.randn(n, patch_dim, generator=gen)
            batch[f"{key}_grid_thw"] = torch.tensor(grids)
    return batch


# Qwen3-VL: each video frame its own run, a timestamp token and vision start/end around it
QWEN3_VIDEOS = [(2, 4, 4)]  # 2 frames of 2x2 merged tokens
QWEN3_ROWS = [
    [[5], [V_START], "image", [V_END], [20, 21]],
    [[6], [V_START], "image", [V_END], [30, V_START], "video", [V_END], [31, V_START], "video"]
    + [[V_END]],
    [[8, 9, 10, 11]],
]


def qwen3_batch(pad_left: bool, images=QWEN_IMAGES, videos=QWEN3_VIDEOS) -> dict:
    return qwen_batch(pad_left, images, videos, rows=QWEN3_ROWS, frame_runs=True)


def pooled(n: int, window: int = 2) -> int:
    return math.ceil(n / window)


@contextlib.contextmanager
def frozen_features(inner, getter: str, features):
    """Replace `inner.<getter>` (e.g. get_image_features) by one returning `features` again
    (a fresh output object each call: adapters replace its pooler_output), so that counting
    kernels sees the adapter's work only, not the vision tower's."""
    outputs = tuple(features.pooler_output)
    setattr(inner, getter, lambda *args, **kwargs: type(features)(pooler_output=list(outputs)))
    try:
        yield
    finally:
        delattr(inner, getter)


# ---- the checks every family passes ---------------------------------------------------------


def check_eval_equals_unpatched(model, batch) -> None:
    """Eval logits with the patch (VTC + LDS) are exactly the unpatched model's."""
    from sts_kernels.integrations.hf import apply_sts

    model.eval()
    with torch.no_grad():
        dense = model(**batch).logits
        handle = apply_sts(model)
        assert torch.equal(model(**batch).logits, dense)
    handle.remove()
    model.train()


def check_train_step_is_sparser(model, batch, **apply_kwargs) -> object:
    """A train step with compression and skipping (each unless `apply_kwargs` turn it off):
    finite loss; VTC: fewer visual and LM tokens than the batch; LDS: fewer layer rows than
    dense; gradients reach the model. Returns the handle's report."""
    from sts_kernels.integrations.hf import apply_sts

    model.train()
    kwargs = {"skip": {"seed": 0, "p_max": 0.9}} | apply_kwargs
    handle = apply_sts(model, **kwargs)
    try:
        loss = model(**batch).loss
        loss.backward()
        report = copy.copy(handle.report)
        vtc, lds = handle.compressor is not None, handle.skipper is not None
    finally:
        handle.remove()
    assert torch.isfinite(loss)
    if vtc:
        assert report.lm_tokens < report.lm_tokens_in, report
        assert report.visual_tokens_kept < report.visual_tokens_in, report
    if lds:
        assert sum(report.rows_run) < sum(report.rows_total), report
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    return report


def check_remove_restores(model, batch) -> None:
    """After a patched train step, remove() leaves state_dict, modules and eval logits exactly
    as before."""
    from sts_kernels.integrations.hf import apply_sts

    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    model.eval()
    with torch.no_grad():
        dense = model(**batch).logits
    handle = apply_sts(model, skip={"seed": 0})
    model.train()
    model(**batch).loss.backward()
    handle.remove()
    model.zero_grad()
    assert dict(model.named_modules()) == modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, dense)
    model.train()


def _pool_item(f, thw, time_window: int):
    """Reference VTC of one Qwen item [t*(h/2)*(w/2), D]: 2x2 pooling of every frame, then
    windows of `time_window` frames averaged. Returns (tokens, rope grid)."""
    from sts_kernels import token_pool

    t, h, w = thw
    frames = token_pool(f.view(t, (h // 2) * (w // 2), -1), (h // 2, w // 2), (2, 2))
    out = torch.stack([frames[i : i + time_window].mean(0) for i in range(0, t, time_window)])
    return out.reshape(-1, f.shape[-1]), (out.shape[0], 2 * pooled(h // 2), 2 * pooled(w // 2))


def check_qwen_vtc_matches_reference(
    model, pad_left: bool, time_window: int, make_batch=qwen_batch, videos=QWEN_VIDEOS, **extra
) -> None:
    """The patched Qwen model (VTC only) on `make_batch(pad_left)` gives the logits, loss and
    shrunk inputs of the unpatched model fed reference-pooled features (DeepStack levels
    pooled the same way, where the model has them) and the shrunk batch (its M-RoPE positions
    rebuilt from the pooled grids; `extra` model inputs, with `second_per_grid_ts` scaled by
    `time_window` for the reference). Checks the report's image / video counts."""
    from sts_kernels.integrations.hf import apply_sts

    ref = copy.deepcopy(model)
    batch = make_batch(pad_left) | extra
    handle = apply_sts(model, compress={"time_window": time_window}, skip=False)
    out = model(**batch)

    mm, rope, counts = {}, {}, {}
    with torch.no_grad():
        for key, grids, getter in (
            ("image", QWEN_IMAGES, ref.model.get_image_features),
            ("video", videos, ref.model.get_video_features),
        ):
            pixels = batch["pixel_values" if key == "image" else "pixel_values_videos"]
            feats = getter(pixels, torch.tensor(grids), return_dict=True)
            items = [_pool_item(f, g, time_window) for f, g in zip(feats.pooler_output, grids)]
            feats.pooler_output = [x for x, _ in items]
            if getattr(feats, "deepstack_features", None):
                feats.deepstack_features = [
                    [_pool_item(f, g, time_window)[0] for f, g in zip(level, grids)]
                    for level in feats.deepstack_features
                ]
            mm[key], rope[key] = feats, [g for _, g in items]
            counts[key] = (sum(t * h * w // 4 for t, h, w in grids), sum(len(x) for x, _ in items))
    shrunk = make_batch(pad_left, images=rope["image"], videos=rope["video"])
    del shrunk["pixel_values"], shrunk["pixel_values_videos"]
    if "second_per_grid_ts" in extra:
        shrunk["second_per_grid_ts"] = extra["second_per_grid_ts"] * time_window
    expected = ref(**shrunk, mm_encoder_outputs=mm)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert torch.equal(handle.last_inputs[name], shrunk[name]), name

    r = handle.report
    assert (r.image_tokens_in, r.image_tokens_kept) == counts["image"] == (16 + 6, 4 + 2)
    assert (r.video_tokens_in, r.video_tokens_kept) == counts["video"]
    assert r.visual_tokens_kept == counts["image"][1] + counts["video"][1]
    handle.remove()


# ---- every registered class: a tiny model and a batch (left padded) -------------------------
CASES = {
    "LlavaForConditionalGeneration": (make_llava, lambda m: llava_batch(True)),
    "LlavaNextForConditionalGeneration": (make_llava_next, lambda m: llava_next_batch(m, True)),
    "LlavaNextVideoForConditionalGeneration": (
        make_llava_next_video,
        lambda m: llava_next_video_batch(m, True),
    ),
    "LlavaOnevisionForConditionalGeneration": (
        make_llava_onevision,
        lambda m: llava_onevision_batch(m, True),
    ),
    "Qwen2VLForConditionalGeneration": (make_qwen2_vl, lambda m: qwen_batch(True)),
    "Qwen2_5_VLForConditionalGeneration": (make_qwen2_5_vl, lambda m: qwen_batch(True)),
    "Qwen3VLForConditionalGeneration": (make_qwen3_vl, lambda m: qwen3_batch(True)),
    "Qwen3VLMoeForConditionalGeneration": (
        lambda: make_qwen3_vl(moe=True),
        lambda m: qwen3_batch(True),
    ),
    "InternVLForConditionalGeneration": (make_internvl, lambda m: tiled_batch("internvl", True)),
    "Gemma3ForConditionalGeneration": (make_gemma3, lambda m: tiled_batch("gemma3", True)),
    "SmolVLMForConditionalGeneration": (make_smolvlm, lambda m: tiled_batch("smolvlm", True)),
    "Idefics3ForConditionalGeneration": (make_idefics3, lambda m: tiled_batch("idefics3", True)),
    "MllamaForConditionalGeneration": (make_mllama, lambda m: mllama_batch(True)),
}
