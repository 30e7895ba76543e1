"""Batches for the tiny Hugging Face VLMs of bench/models.py (random init, no downloads; its
makers are re-exported here), the checks every family's adapter passes, and `CASES`: per
registered class its tiny model, its batch and the arguments of the shared checks, which
tests/hf/test_hf_families.py runs for every family (tests/hf/test_hf_<family>.py: the checks
of one family's layout; tests/hf/test_hf_support_claims.py: the README table's claims).

bench/demo.py builds its LLaVA and Qwen2.5-VL with the same makers, at its own sizes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from bench.models import (  # noqa: F401  (re-exported: the tests import them from here)
    IMG,
    PAD,
    V_END,
    V_START,
    VID,
    clip_config,
    llama_config,
    make_gemma3,
    make_idefics3,
    make_internvl,
    make_llava,
    make_llava_next,
    make_llava_next_video,
    make_llava_onevision,
    make_mllama,
    make_qwen2_5_vl,
    make_qwen2_vl,
    make_qwen3_vl,
    make_smolvlm,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


# ---- LLaVA family ---------------------------------------------------------------------------


# several images in a row, one image, text only
LLAVA_ROWS = [[[5, 6], "image", [7], "image", [8, 9]], [[10], "image", [11, 12]], [[14, 15, 16]]]


def llava_batch(pad_left: bool, images: int = 3, rows=LLAVA_ROWS, tokens: int = 16) -> dict:
    batch = build_ids(rows, {"image": [tokens] * images}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    batch["pixel_values"] = torch.randn(images, 3, 32, 32, generator=gen)
    return batch


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


def llava_next_merge_pack(packed, newline, crop_grid, ratio: float = 0.5):
    """One LLaVA-NeXT image merged plainly: the 4x4 base as one item, every crop row on its
    own, a newline after every merged row."""
    from sts_kernels import bipartite_merge

    hc, wc = crop_grid
    base = bipartite_merge(packed[None, :16], round(16 * (1 - ratio))).x[0]
    rows = packed[16:].view(hc, wc + 1, -1)[:, :wc]  # [H, W, D]
    rows = bipartite_merge(rows, round(wc * (1 - ratio))).x  # [H, W', D]
    rows = torch.cat([rows, newline.expand(hc, 1, -1)], 1).reshape(-1, packed.shape[-1])
    return torch.cat([base, rows])


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


# ---- tiled families: InternVL, Gemma 3, SmolVLM / Idefics3 -------------------------------------
# every tile a 4x4 grid of 16 tokens; rows: two tiles/images, one, text only

TILED_ROWS = [[[5], "image", [6], "image", [7, 8]], [[9, 10], "image", [11]], [[12, 13, 14]]]


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


# ---- Qwen2-VL / Qwen2.5-VL / Qwen3-VL -------------------------------------------------------

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
    from sts_kernels.integrations.hf.adapters import adapter_for

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
        if adapter_for(model).tokens_in_sequence:  # else cross-attention states shrink
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


# ---- every registered class: its tiny model, its batch, the shared checks' arguments ---------


@dataclass(frozen=True)
class Train:
    """One `check_train_step_is_sparser` run: the batch's padding side, apply_sts arguments
    and the report fields it must show."""

    pad_left: bool = True
    kwargs: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        words = ["left" if self.pad_left else "right"]
        for key, value in self.kwargs.items():
            args = value.items() if isinstance(value, dict) else ()
            words.append(f"{key}({','.join(f'{k}={v}' for k, v in args)})" if args else key)
        return "-".join(words)


@dataclass(frozen=True)
class Case:
    """A registered class's tiny model (`make()`) and batch (`batch(model, pad_left)`).
    `train`: the shared train-step checks; `eval_pad_left`: the batch's padding side for
    `check_eval_equals_unpatched` and `check_remove_restores`; `needs_encoder_outputs`: the
    shared checks need transformers' mm_encoder_outputs."""

    make: Callable
    batch: Callable
    train: tuple[Train, ...] = (Train(False), Train(True))
    eval_pad_left: bool = True
    needs_encoder_outputs: bool = False


def _tiled(make, family: str) -> Case:
    """InternVL, Gemma 3, SmolVLM, Idefics3: 3 tiles of 16 tokens, pooled 2x2 or merged by half."""
    return Case(
        make,
        lambda m, pad_left: tiled_batch(family, pad_left),
        tuple(
            Train(
                pad,
                {"compress": {"mode": mode, "ratio": 0.5}},
                dict(image_tokens_in=48, image_tokens_kept=kept),
            )
            for pad, mode, kept in [(False, "pool", 12), (True, "merge", 24)]
        ),
        eval_pad_left=False,
    )


SECONDS = {"second_per_grid_ts": torch.tensor([0.5])}  # Qwen2.5-VL: one video's frame times
TIME_WINDOW_2 = {"compress": {"time_window": 2}}
QWEN_COUNTS = {"image_tokens_kept": 6, "video_tokens_kept": 4}  # 2x2 pooled, time window 1

CASES = {
    "LlavaForConditionalGeneration": Case(
        make_llava,
        lambda m, pad_left: llava_batch(pad_left),
        tuple(
            Train(
                pad,
                {"compress": {"mode": mode, "ratio": 0.5}},
                dict(image_tokens_in=48, image_tokens_kept=kept, video_tokens_in=0),
            )
            for mode, kept in (("pool", 12), ("merge", 24))
            for pad in (False, True)
        ),
    ),
    "LlavaNextForConditionalGeneration": Case(make_llava_next, llava_next_batch),
    "LlavaNextVideoForConditionalGeneration": Case(
        make_llava_next_video,
        llava_next_video_batch,
        tuple(Train(pad, TIME_WINDOW_2, {"video_tokens_kept": 4}) for pad in (False, True)),
        needs_encoder_outputs=True,
    ),
    "LlavaOnevisionForConditionalGeneration": Case(
        make_llava_onevision,
        llava_onevision_batch,
        # 4 frames -> 2 windows of 1 token + a newline, 2 videos
        (Train(True, TIME_WINDOW_2, {"video_tokens_kept": 2 * (2 + 1)}),),
        needs_encoder_outputs=True,
    ),
    "Qwen2VLForConditionalGeneration": Case(
        make_qwen2_vl,
        lambda m, pad_left: qwen_batch(pad_left),
        tuple(
            Train(pad, TIME_WINDOW_2, {"video_tokens_kept": 2, "image_tokens_kept": 6})
            for pad in (False, True)
        ),
    ),
    "Qwen2_5_VLForConditionalGeneration": Case(
        make_qwen2_5_vl,
        lambda m, pad_left: qwen_batch(pad_left) | SECONDS,
        tuple(Train(pad, {}, QWEN_COUNTS) for pad in (False, True)),
        eval_pad_left=False,
    ),
    "Qwen3VLForConditionalGeneration": Case(
        make_qwen3_vl,
        lambda m, pad_left: qwen3_batch(pad_left),
        # 1 token a frame
        (Train(True, {}, {"video_tokens_kept": 2, "image_tokens_kept": 6}),),
        needs_encoder_outputs=True,
    ),
    "Qwen3VLMoeForConditionalGeneration": Case(
        lambda: make_qwen3_vl(moe=True),
        lambda m, pad_left: qwen3_batch(pad_left),
        tuple(Train(False, {"skip": {"mode": mode, "seed": 0}}) for mode in ("sample", "token")),
        needs_encoder_outputs=True,
    ),
    "InternVLForConditionalGeneration": _tiled(make_internvl, "internvl"),
    "Gemma3ForConditionalGeneration": _tiled(make_gemma3, "gemma3"),
    "SmolVLMForConditionalGeneration": _tiled(make_smolvlm, "smolvlm"),
    "Idefics3ForConditionalGeneration": _tiled(make_idefics3, "idefics3"),
    # VTC compresses the cross-attention states (test_hf_mllama.py: the oracle, the
    # cross-attention layer's gradient, dense without skips)
    "MllamaForConditionalGeneration": Case(
        make_mllama,
        lambda m, pad_left: mllama_batch(pad_left),
        (Train(True), Train(False, {"compress": {"mode": "merge", "ratio": 0.5}})),
    ),
}


# ---- issue 18, group B (tests/hf/test_hf_group_b.py: their oracle checks) ------------------

from bench.models import (  # noqa: E402
    GLM_VIDEO_END,
    GLM_VIDEO_START,
    OVIS_INDICATORS,
    make_deepseek_vl,
    make_glm4v,
    make_got_ocr2,
    make_lfm2_vl,
    make_llava_onevision1_5,
    make_ovis2,
)

# GLM-4V: images as Qwen's (`<|begin_of_image|>` tokens `<|end_of_image|>`); a video is 2
# frames, each `<|begin_of_image|>` + its tokens + `<|end_of_image|>` + a timestamp, inside
# `<|begin_of_video|>` ... `<|end_of_video|>`, its tokens the image token id typed 2 in
# mm_token_type_ids (as the processor builds them). transformers 5.25's GLM-4V counts video
# frames as image placeholders too, so images and videos never share a batch.
GLM_ROWS = [
    [[5], [V_START], "image", [V_END], [20, 21]],
    [[6, 7], [V_START], "image", [V_END], [22]],
    [[8, 9, 10, 11]],
]
GLM_VIDEO_ROWS = [
    [[6, GLM_VIDEO_START, V_START], "video", [V_END, 30, V_START], "video"]
    + [[V_END, 31, GLM_VIDEO_END, 22]],
    [[8, 9, 10, 11]],
]


def glm4v_batch(pad_left: bool, images=QWEN_IMAGES, videos=()) -> dict:
    """Images only, or (`videos`: raw-patch grids) videos only."""
    if videos:
        batch = qwen_batch(pad_left, [], list(videos), rows=GLM_VIDEO_ROWS, frame_runs=True)
    else:
        batch = qwen_batch(pad_left, images, [], rows=GLM_ROWS)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == VID, IMG)
    return batch


def llava_onevision1_5_batch(pad_left: bool, images=QWEN_IMAGES, videos=QWEN_VIDEOS) -> dict:
    """Qwen's rows (`<|vision_start|>` placeholders `<|vision_end|>`), images and a video; the
    tower takes 3 x 4 x 4 pixels a patch (no temporal patches); no mm_token_type_ids."""
    batch = qwen_batch(pad_left, images, videos)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = torch.randn(len(batch[key]), 3 * 4 * 4, generator=gen)
    return batch


# LFM2-VL: row 0 an image of 1x2 tiles (8x8 patches each) and its thumbnail (4x6), between
# `<|image_start|>` / `<|image_end|>` with `<|img_row_1_col_j|>` / `<|img_thumbnail|>` markers;
# row 1 one single-tile image (6x8 patches); row 2 text only. Tokens: (h/2) x (w/2) an entry.
LFM2_START, LFM2_END, LFM2_THUMB, LFM2_R1C1, LFM2_R1C2 = 990, 989, 988, 987, 986
LFM2_SHAPES = [(8, 8), (8, 8), (4, 6), (6, 8)]
LFM2_ROWS = [
    [[5, LFM2_START, LFM2_R1C1], "image", [LFM2_R1C2], "image", [LFM2_THUMB], "image"]
    + [[LFM2_END, 6]],
    [[7, LFM2_START], "image", [LFM2_END, 8, 9]],
    [[12, 13, 14]],
]


def lfm2_vl_batch(pad_left: bool) -> dict:
    batch = build_ids(LFM2_ROWS, {"image": [h * w // 4 for h, w in LFM2_SHAPES]}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(len(LFM2_SHAPES), 64, dtype=torch.bool)  # patch rows padded to 64
    for i, (h, w) in enumerate(LFM2_SHAPES):
        mask[i, : h * w] = True
    return batch | {
        "pixel_values": torch.randn(len(LFM2_SHAPES), 64, 3 * 4 * 4, generator=gen),
        "spatial_shapes": torch.tensor(LFM2_SHAPES),
        "pixel_attention_mask": mask,
    }


# Ovis2 (processor layout): `<IMG_START>`, the global view's atoms, `<IMG_GRID>`, then for a
# multi-tile image every tile's atoms with `<IMG_COL>` between columns (`<IMG_ROW>` between
# rows), `<IMG_END>`. Row 0: an image of 1x2 tiles (3 tiles); row 1: a one-tile image.
_START, _GRID, _COL, _ROW, _END = OVIS_INDICATORS
OVIS2_ROWS = [
    [[5, _START], "image", [_GRID], "image", [_COL], "image", [_END, 6]],
    [[7, _START], "image", [_GRID, _END, 8, 9]],
    [[12, 13, 14]],
]


def ovis2_batch(pad_left: bool, tokens: int = 16) -> dict:
    batch = build_ids(OVIS2_ROWS, {"image": [tokens] * 4}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    return batch | {"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)}


def generic_batch(pad_left: bool, tokens: int = 16, size: int = 32) -> dict:
    """LLAVA_ROWS (3 images, one placeholder run each) for the convention fallback's families:
    DeepSeek-VL (4x4 tokens of a 32 px image), GOT-OCR2 (2x2 of a 128 px one)."""
    batch = build_ids(LLAVA_ROWS, {"image": [tokens] * 3}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(1)
    return batch | {"pixel_values": torch.randn(3, 3, size, size, generator=gen)}


def _generic(make, tokens: int, size: int, kept: int) -> Case:
    return Case(
        make,
        lambda m, pad_left: generic_batch(pad_left, tokens, size),
        (Train(False, {}, {"image_tokens_in": 3 * tokens, "image_tokens_kept": kept}),),
    )


CASES.update(
    {
        "DeepseekVLForConditionalGeneration": _generic(make_deepseek_vl, 16, 32, 12),
        "GotOcr2ForConditionalGeneration": _generic(make_got_ocr2, 4, 128, 3),
        "Ovis2ForConditionalGeneration": Case(
            make_ovis2,
            lambda m, pad_left: ovis2_batch(pad_left),
            tuple(
                Train(pad, {"compress": {"mode": mode, "ratio": 0.5}}, {"image_tokens_kept": n})
                for pad, mode, n in ((False, "pool", 16), (True, "merge", 32))
            ),
        ),
        "Lfm2VlForConditionalGeneration": Case(
            make_lfm2_vl,
            lambda m, pad_left: lfm2_vl_batch(pad_left),
            tuple(
                Train(pad, {"compress": {"mode": mode, "ratio": 0.5}}, {"image_tokens_in": 50})
                for pad, mode in ((False, "pool"), (True, "merge"))
            ),
        ),
        "LlavaOnevision15ForConditionalGeneration": Case(
            make_llava_onevision1_5,
            lambda m, pad_left: llava_onevision1_5_batch(pad_left),
            tuple(Train(pad, {}, QWEN_COUNTS) for pad in (False, True)),
        ),
        "Glm4vForConditionalGeneration": Case(
            make_glm4v,
            lambda m, pad_left: glm4v_batch(pad_left),
            tuple(
                Train(pad, {}, {"image_tokens_in": 22, "image_tokens_kept": 6})
                for pad in (False, True)
            ),
        ),
        "Glm4vMoeForConditionalGeneration": Case(
            lambda: make_glm4v(moe=True),
            lambda m, pad_left: glm4v_batch(pad_left),
            tuple(
                Train(False, {"skip": {"mode": mode, "seed": 0}}) for mode in ("sample", "token")
            ),
        ),
    }
)
# ---- end of issue 18, group B ----


# ---- issue 18, group A (tests/hf/test_hf_group_a.py: their oracle checks) ------------------

from bench.models import make_llava_pixtral, make_mistral3  # noqa: E402, F401  (re-exported)

# Pixtral layout (Mistral 3, LLaVA with a Pixtral tower): every row of an image's placeholders
# ends with [IMG_BREAK], the last with [IMG_END] instead; (H, W) px of LLAVA_ROWS' images,
# 8 px a token: grids 5x6, 4x4, 6x3 (pooled 2x2: 3x3, 2x2, 3x2)
PIX_BREAK, PIX_END = 993, 992
PIXTRAL_SIZES = [(40, 48), (32, 32), (48, 24)]


def pixtral_block(h: int, w: int) -> list[int]:
    """The Pixtral processor's tokens for an (h, w) grid of visual tokens."""
    block = ([IMG] * w + [PIX_BREAK]) * h
    block[-1] = PIX_END
    return block


def pixtral_batch(pad_left: bool, grids=None, sizes=PIXTRAL_SIZES, rows=LLAVA_ROWS) -> dict:
    """LLAVA_ROWS with Pixtral blocks (`grids`, default the images' own at 8 px a token);
    labels -100 on placeholders and markers; pixels padded to the largest size."""
    blocks = iter(pixtral_block(*g) for g in grids or [(h // 8, w // 8) for h, w in sizes])
    parts = [[next(blocks) if part == "image" else part for part in row] for row in rows]
    batch = build_ids(parts, {}, pad_left)
    del batch["mm_token_type_ids"]
    marker = torch.isin(batch["input_ids"], torch.tensor([IMG, PIX_BREAK, PIX_END]))
    batch["labels"] = batch["labels"].masked_fill(marker, -100)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.zeros(len(sizes), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for k, (h, w) in enumerate(sizes):
        pixels[k, :, :h, :w] = torch.randn(3, h, w, generator=gen)
    return batch | {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


PIXTRAL_TRAIN = tuple(
    Train(pad, {"compress": {"mode": "pool"}}, dict(image_tokens_in=64, image_tokens_kept=19))
    for pad in (False, True)
)

CASES.update(
    {
        "Mistral3ForConditionalGeneration": Case(
            make_mistral3, lambda m, pad_left: pixtral_batch(pad_left), PIXTRAL_TRAIN
        ),
    }
)


from dataclasses import replace  # noqa: E402

from bench.models import (  # noqa: E402, F401  (re-exported)
    make_aya_vision,
    make_cohere2_vision,
    make_paligemma,
    make_vipllava,
)

# Tiles with text markers: "tile" stands for a tile's 16 placeholders (4x4 tokens). Aya Vision:
# <|START_OF_IMG|> TILE_1 tile ... TILE_GLOBAL tile <|END_OF_IMG|>; Cohere2-Vision:
# <|START_OF_IMG|> (tile <|IMG_LINE_BREAK|>) per tile <|END_OF_IMG|>
IMG_START, IMG_STOP, TILE_1, TILE_GLOBAL, LINE_BREAK = 991, 990, 989, 988, 987
AYA_ROWS = [
    [[5, IMG_START, TILE_1], "tile", [TILE_GLOBAL], "tile", [IMG_STOP, 6]],
    [[7, IMG_START, TILE_GLOBAL], "tile", [IMG_STOP, 8, 9]],
    [[12, 13, 14]],
]
COHERE2_ROWS = [
    [[5, IMG_START], "tile", [LINE_BREAK], "tile", [LINE_BREAK, IMG_STOP, 6]],
    [[7, IMG_START], "tile", [LINE_BREAK, IMG_STOP, 8, 9]],
    [[12, 13, 14]],
]
MARKERS = [IMG, IMG_START, IMG_STOP, TILE_1, TILE_GLOBAL, LINE_BREAK]


def marked_batch(rows, pad_left: bool, tokens: int = 16) -> dict:
    """`rows` with `tokens` placeholders a tile, labels -100 on placeholders and markers, one
    random 32 px image a tile (`pixel_values` [tiles, 3, 32, 32])."""
    parts = [[[IMG] * tokens if part == "tile" else part for part in row] for row in rows]
    batch = build_ids(parts, {}, pad_left)
    del batch["mm_token_type_ids"]
    marker = torch.isin(batch["input_ids"], torch.tensor(MARKERS))
    batch["labels"] = batch["labels"].masked_fill(marker, -100)
    tiles = sum(part == "tile" for row in rows for part in row)
    gen = torch.Generator().manual_seed(1)
    return batch | {"pixel_values": torch.randn(tiles, 3, 32, 32, generator=gen)}


# PaliGemma: per sample (images, prompt, suffix); the processor's layout: every image's
# placeholders first, then <bos> prompt "\n" (the prefix, token_type_ids 0), then suffix <eos>
# (token_type_ids 1, the only labels)
PALIGEMMA_ROWS = [(1, [5, 6], [20, 21]), (2, [7], [22]), (0, [8, 9], [23])]
NEWLINE = 108


def paligemma_batch(pad_left: bool, tokens: int = 16) -> dict:
    prefix = [[IMG] * tokens * n + [1] + prompt + [NEWLINE] for n, prompt, _ in PALIGEMMA_ROWS]
    suffix = [text + [2] for _, _, text in PALIGEMMA_ROWS]
    batch = build_ids([[p, s] for p, s in zip(prefix, suffix)], {}, pad_left)
    del batch["mm_token_type_ids"]
    types = build_ids([[[0] * len(p), [1] * len(s)] for p, s in zip(prefix, suffix)], {}, pad_left)
    batch["token_type_ids"] = types["input_ids"]
    batch["labels"] = torch.where(batch["token_type_ids"] == 1, batch["input_ids"], -100)
    images = sum(n for n, _, _ in PALIGEMMA_ROWS)
    gen = torch.Generator().manual_seed(1)
    return batch | {"pixel_values": torch.randn(images, 3, 32, 32, generator=gen)}


# LLaVA's layout (VipLlava, FastVLM, PerceptionLM): pooled right-padded, merged left-padded
LLAVA_LIKE_TRAIN = _tiled(make_vipllava, "vipllava").train

CASES.update(
    {
        "VipLlavaForConditionalGeneration": replace(
            CASES["LlavaForConditionalGeneration"], make=make_vipllava, train=LLAVA_LIKE_TRAIN
        ),
        "AyaVisionForConditionalGeneration": replace(
            _tiled(make_aya_vision, "aya_vision"),
            batch=lambda m, pad_left: marked_batch(AYA_ROWS, pad_left),
        ),
        "Cohere2VisionForConditionalGeneration": replace(
            _tiled(make_cohere2_vision, "cohere2_vision"),
            batch=lambda m, pad_left: marked_batch(COHERE2_ROWS, pad_left),
        ),
        "PaliGemmaForConditionalGeneration": replace(
            _tiled(make_paligemma, "paligemma"),
            batch=lambda m, pad_left: paligemma_batch(pad_left),
        ),
    }
)


from bench.models import make_fast_vlm, make_perception_lm  # noqa: E402, F401  (re-exported)


def perception_lm_batch(pad_left: bool, tiles: int = 1, tokens: int = 16) -> dict:
    """LLAVA_ROWS' 3 images of `tiles` tiles each: one run of tiles * tokens placeholders an
    image, `pixel_values` [images, tiles, 3, 32, 32]."""
    batch = llava_batch(pad_left, tokens=tiles * tokens)
    gen = torch.Generator().manual_seed(1)
    return batch | {"pixel_values": torch.randn(3, tiles, 3, 32, 32, generator=gen)}


# an image (one tile) and videos (3 frames each, as the video processor samples them) mixed;
# a row of text only
PLM_ROWS = [[[5, 6], "image", [7], "video", [8]], [[10], "video", [11, 12]], [[14, 15, 16]]]
PLM_FRAMES = 3


def perception_lm_video_batch(pad_left: bool, tokens: int = 16) -> dict:
    """PLM_ROWS: one run of `tokens` image placeholders an image, frames * `tokens` video
    placeholders a video (the processor's layout), pixels of 32 px tiles / frames."""
    batch = build_ids(PLM_ROWS, {"image": [tokens], "video": [PLM_FRAMES * tokens] * 2}, pad_left)
    del batch["mm_token_type_ids"]
    gen = torch.Generator().manual_seed(2)
    videos = torch.randn(2, PLM_FRAMES, 3, 32, 32, generator=gen)
    return batch | {
        "pixel_values": torch.randn(1, 1, 3, 32, 32, generator=gen),
        "pixel_values_videos": videos,
    }


CASES.update(
    {
        "FastVlmForConditionalGeneration": replace(
            CASES["LlavaForConditionalGeneration"], make=make_fast_vlm, train=LLAVA_LIKE_TRAIN
        ),
        "PerceptionLMForConditionalGeneration": replace(
            CASES["LlavaForConditionalGeneration"],
            make=make_perception_lm,
            train=LLAVA_LIKE_TRAIN,
            batch=lambda m, pad_left: perception_lm_batch(pad_left),
        ),
    }
)


# ---- issue 18, group C (tests/hf/test_hf_group_c.py: their oracle checks) ------------------

from bench.models import make_llama4  # noqa: E402, F401  (re-exported)

# Llama 4 (processor layout): <|image_start|>, per tile row its tiles' <|patch|> runs with
# <|tile_x_separator|> between them and <|tile_y_separator|> after the row, then <|image|> and
# the global view's run, <|image_end|>. Row 0: an image of 1x2 tiles + global view (3 tiles);
# row 1: a one-tile image (its global view only); row 2: text only. 16 placeholders a tile.
L4_X, L4_Y, L4_IMAGE = 985, 984, 983
LLAMA4_ROWS = [
    [[5, V_START], "tile", [L4_X], "tile", [L4_Y, L4_IMAGE], "tile", [V_END, 6]],
    [[7, V_START, L4_IMAGE], "tile", [V_END, 8, 9]],
    [[12, 13, 14]],
]


def llama4_batch(pad_left: bool, tokens: int = 16) -> dict:
    """LLAMA4_ROWS, `tokens` placeholders a tile, labels -100 on them and on the markers;
    `pixel_values` the flat tile list [4, 3, 32, 32] (image 0's tiles, its global view, image 1)."""
    return unlabel(marked_batch(LLAMA4_ROWS, pad_left, tokens), [L4_X, L4_Y, L4_IMAGE])


def unlabel(batch: dict, markers: list[int]) -> dict:
    """Labels -100 also on `markers` and the begin / end of image tokens (V_START / V_END)."""
    marker = torch.isin(batch["input_ids"], torch.tensor([V_START, V_END, *markers]))
    batch["labels"] = batch["labels"].masked_fill(marker, -100)
    return batch


def _pool_and_merge(tiles: int, merged: int) -> tuple[Train, Train]:
    """`tiles` tiles of 16 tokens: pooled 2x2 right-padded, merged (`merged` kept) left-padded."""
    counts = {"image_tokens_in": 16 * tiles}
    return (
        Train(False, {"compress": {"mode": "pool"}}, counts | {"image_tokens_kept": 4 * tiles}),
        Train(True, {"compress": {"mode": "merge"}}, counts | {"image_tokens_kept": merged}),
    )


CASES.update(
    {
        "Llama4ForConditionalGeneration": Case(
            make_llama4, lambda m, pad_left: llama4_batch(pad_left), _pool_and_merge(4, 32), False
        ),
    }
)


from bench.models import make_idefics2, make_janus  # noqa: E402, F401  (re-exported)

# Janus: <begin_of_image> placeholders <end_of_image> per image, in LLAVA_ROWS' places
JANUS_ROWS = [
    [[5, 6, V_START], "image", [V_END, 7, V_START], "image", [V_END, 8, 9]],
    [[10, V_START], "image", [V_END, 11, 12]],
    [[14, 15, 16]],
]


def janus_batch(pad_left: bool, tokens: int = 16) -> dict:
    return unlabel(llava_batch(pad_left, rows=JANUS_ROWS, tokens=tokens), [])


# Idefics2 (processor layout): every image <fake_token_around_image> + its latents' run +
# <fake_token_around_image>, adjacent images sharing one (as the crops of a split image). Row
# 0: two adjacent images, row 1: one, row 2: text only; pixels as SmolVLM's (zero: padding).
FAKE_AROUND = 982
IDEFICS2_ROWS = [
    [[5, FAKE_AROUND], "tile", [FAKE_AROUND], "tile", [FAKE_AROUND, 7, 8]],
    [[9, 10, FAKE_AROUND], "tile", [FAKE_AROUND, 11]],
    [[12, 13, 14]],
]


def idefics2_batch(pad_left: bool, tokens: int = 16) -> dict:
    """IDEFICS2_ROWS, `tokens` latents an image; `pixel_values` [3, 2, 3, 32, 32]."""
    batch = unlabel(marked_batch(IDEFICS2_ROWS, pad_left, tokens), [FAKE_AROUND])
    return batch | {"pixel_values": tiled_batch("smolvlm", pad_left)["pixel_values"]}


CASES.update(
    {
        "JanusForConditionalGeneration": Case(
            make_janus, lambda m, pad_left: janus_batch(pad_left), _pool_and_merge(3, 24), False
        ),
        # LDS only (perceiver latents; test_hf_group_c.py: the merge path, not yet claimed)
        "Idefics2ForConditionalGeneration": Case(
            make_idefics2, lambda m, pad_left: idefics2_batch(pad_left), (Train(False),)
        ),
    }
)
