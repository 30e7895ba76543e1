"""Merge-mode VTC on the Qwen-style families (Qwen2.5-VL, Qwen3-VL and its MoE, GLM-4V,
LLaVA-OneVision-1.5): images and every video frame merged on their own, the LM's input
checked against an oracle that never runs the patch.

The oracle: the unpatched model's own features, merged by hand with `bipartite_merge` per
frame (DeepStack levels: the mean of every group of the main merge's `index`, computed here),
the shrunk ids built by hand from the family's rows, and (M-RoPE families) positions taken
from the unpatched `get_rope_index` of the FULL batch at every kept token's anchor (the
destination it stands at, STS_SPEC §3); the unpatched model fed all that gives the patched
model's logits and loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    GLM_ROWS,
    GLM_VIDEO_ROWS,
    IMG,
    QWEN3_ROWS,
    QWEN_ROWS,
    VID,
    build_ids,
    glm4v_batch,
    llava_onevision1_5_batch,
    make_glm4v,
    make_llava_onevision1_5,
    make_qwen2_5_vl,
    make_qwen3_vl,
    needs_encoder_outputs,
    qwen3_batch,
    qwen_batch,
)

from sts_kernels import bipartite_merge  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402

RATIO = 0.5  # the compressor merges round(n * RATIO) tokens of every frame of n


def _no_types(batch: dict) -> dict:
    del batch["mm_token_type_ids"]
    return batch


def _video_as_images(batch: dict) -> dict:
    """GLM-4V: video frames are image tokens (typed 2 in mm_token_type_ids)."""
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == VID, IMG)
    return batch


@dataclass(frozen=True)
class Family:
    """A tiny model, its batch, and how to build that batch's layout by hand: `rows` for
    `build_ids`, `frame_runs` (each video frame its own placeholder run), `finish` (the
    family's edits of build_ids' output), `video_token` (the video placeholders' id)."""

    make: Callable
    batch: Callable[[bool], dict]
    rows: list
    frame_runs: bool = False
    finish: Callable[[dict], dict] = lambda batch: batch
    video_token: int = VID
    mrope: bool = True  # M-RoPE positions (else the LM numbers 1-D positions itself)


FAMILIES = {
    "qwen2_5_vl": Family(make_qwen2_5_vl, qwen_batch, QWEN_ROWS),
    "qwen3_vl": Family(make_qwen3_vl, qwen3_batch, QWEN3_ROWS, frame_runs=True),
    "qwen3_vl_moe": Family(
        lambda: make_qwen3_vl(moe=True), qwen3_batch, QWEN3_ROWS, frame_runs=True
    ),
    "glm4v_images": Family(make_glm4v, glm4v_batch, GLM_ROWS),
    "glm4v_moe_images": Family(lambda: make_glm4v(moe=True), glm4v_batch, GLM_ROWS),
    "glm4v_video": Family(
        make_glm4v,
        lambda pad_left: glm4v_batch(pad_left, videos=[(2, 4, 4)]),
        GLM_VIDEO_ROWS,
        frame_runs=True,
        finish=_video_as_images,
        video_token=IMG,
    ),
    "llava_onevision1_5": Family(
        make_llava_onevision1_5, llava_onevision1_5_batch, QWEN_ROWS, finish=_no_types, mrope=False
    ),
}

# modality -> (pixel argument, grid argument, feature getter)
INPUTS = {
    "image": ("pixel_values", "image_grid_thw", "get_image_features"),
    "video": ("pixel_values_videos", "video_grid_thw", "get_video_features"),
}


def anchors_by_hand(index: torch.Tensor, n_out: int) -> list[int]:
    """Per output token, the input it stands at: the destination (odd position) among the
    inputs merged into it, else its only input (STS_SPEC §1's split, protected=0)."""
    anchors = []
    for j in range(n_out):
        members = (index == j).nonzero().squeeze(1).tolist()
        odd = [n for n in members if n % 2 == 1]
        assert len(odd) <= 1 and (odd or len(members) == 1)
        anchors.append(odd[0] if odd else members[0])
    return anchors


def group_means(x: torch.Tensor, index: torch.Tensor, n_out: int) -> torch.Tensor:
    """[t, n, D] -> [t, n_out, D]: out[f, j] is the mean of the x[f, k] with index[f, k] == j
    (a merge of unit-size tokens)."""
    return torch.stack(
        [torch.stack([x[f][index[f] == j].mean(0) for j in range(n_out)]) for f in range(len(x))]
    )


@dataclass
class HandMerge:
    """One modality merged by hand: the features to feed, and per item its grid (t, n) in
    merged tokens and, per frame, the anchors of its n_out merged tokens."""

    features: object
    items: list[tuple[int, int, list[list[int]]]]  # (t, n, anchors [t][n_out])


def merge_by_hand(ref, batch, modality: str) -> HandMerge:
    """The unpatched model's features of `modality`, every frame merged on its own; DeepStack
    levels (Qwen3-VL) averaged over the main merge's groups."""
    pixels, grid_key, getter = INPUTS[modality]
    m = ref.config.vision_config.spatial_merge_size
    with torch.no_grad():
        feats = getattr(ref.model, getter)(batch[pixels], batch[grid_key], return_dict=True)
    levels = getattr(feats, "deepstack_features", None) or []
    merged, merged_levels, items = [], [[] for _ in levels], []
    own_pairs_differ = False
    for k, (t, h, w) in enumerate(batch[grid_key].tolist()):
        n = (h // m) * (w // m)
        frames = feats.pooler_output[k].view(t, n, -1)
        res = bipartite_merge(frames, round(n * RATIO))
        n_out = res.x.shape[1]
        torch.testing.assert_close(res.x, group_means(frames, res.index, n_out))  # unit sizes
        merged.append(res.x.reshape(-1, res.x.shape[-1]))
        for level, out in zip(levels, merged_levels):
            level_frames = level[k].view(t, n, -1)
            out.append(group_means(level_frames, res.index, n_out).reshape(t * n_out, -1))
            own = bipartite_merge(level_frames, round(n * RATIO)).index
            own_pairs_differ |= not torch.equal(own, res.index)
        anchors = [anchors_by_hand(res.index[f], n_out) for f in range(t)]
        items.append((t, n, anchors))
    if levels:  # the levels' own pairing would be a different merge: the test can tell
        assert own_pairs_differ
    feats.pooler_output = merged
    if levels:
        feats.deepstack_features = merged_levels
    return HandMerge(feats, items)


def kept_placeholders(family: Family, modality: str, merge: HandMerge) -> list[int]:
    """Placeholders of the shrunk layout, per run (build_ids' counts): an item's t * n_out,
    or with frame runs n_out a frame."""
    if family.frame_runs and modality == "video":
        return [len(anchors[0]) for t, _, anchors in merge.items for _ in range(t)]
    return [t * len(anchors[0]) for t, _, anchors in merge.items]


def anchor_columns(family: Family, ids, modality: str, merge: HandMerge) -> dict[int, int]:
    """{flat column of a kept placeholder: flat column of its anchor} in the full batch: the
    kept placeholders are an item's first t * n_out, or with frame runs every frame's first
    n_out; frame f's j-th merged token stands at the frame's anchors[f][j]-th placeholder."""
    token = family.video_token if modality == "video" else IMG
    slots = (ids == token).reshape(-1).nonzero().squeeze(1).tolist()
    runs = family.frame_runs and modality == "video"
    out, start = {}, 0
    for t, n, anchors in merge.items:
        n_out = len(anchors[0])
        for f in range(t):
            for j, a in enumerate(anchors[f]):
                out[slots[start + f * (n if runs else n_out) + j]] = slots[start + f * n + a]
        start += t * n
    return out


def rope_of(ref, batch) -> torch.Tensor:
    """[3, B, T] the unpatched model's own M-RoPE positions of `batch`."""
    grids = {key: batch.get(key) for key in ("image_grid_thw", "video_grid_thw")}
    positions, _ = ref.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        attention_mask=batch["attention_mask"],
        **grids,
    )
    return positions


def expected_positions(ref, batch, shrunk, anchors: dict[int, int]) -> torch.Tensor:
    """[3, B, T'] M-RoPE positions of the shrunk batch: the unpatched get_rope_index of the
    full batch, text at its own column, a kept placeholder at its anchor's; 0 on padding."""
    ids, mask, full = batch["input_ids"], batch["attention_mask"], rope_of(ref, batch)
    placeholder = batch["mm_token_type_ids"] != 0
    width, out = ids.shape[1], torch.zeros(3, *shrunk["input_ids"].shape, dtype=full.dtype)
    for row in range(ids.shape[0]):
        sources = [
            anchors.get(row * width + c, row * width + c) % width
            for c in mask[row].nonzero().squeeze(1).tolist()
            if not placeholder[row, c] or row * width + c in anchors
        ]
        cols = shrunk["attention_mask"][row].nonzero().squeeze(1)
        assert len(cols) == len(sources), (row, len(cols), len(sources))
        out[:, row, cols] = full[:, row, sources]
    return out


def caller_positions(ref, batch, family: Family) -> torch.Tensor:
    """Positions a collator would precompute: the unpatched get_rope_index's [3, B, T], or 1-D
    ones counting the valid tokens."""
    if family.mrope:
        return rope_of(ref, batch)
    return (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)


def run_patched(model, batch):
    """A train-mode forward under merge-mode VTC only: (its output, the LM's inputs, report)."""
    handle = apply_sts(model, compress={"mode": "merge", "ratio": RATIO}, skip=False)
    try:
        return model(**batch), handle.last_inputs, copy.copy(handle.report)
    finally:
        handle.remove()


def oracle_inputs(ref, family: Family, batch, pad_left: bool, positions_given: bool):
    """What the unpatched model gets: the shrunk batch built by hand, its positions (M-RoPE:
    the anchors' in the full batch; 1-D given: counted on the shrunk layout) and the features
    merged by hand. Returns (shrunk, positions or {}, mm_encoder_outputs, kept per modality)."""
    merges = {
        mod: merge_by_hand(ref, batch, mod)
        for mod in INPUTS
        if batch.get(INPUTS[mod][0]) is not None
    }
    counts = {mod: kept_placeholders(family, mod, merge) for mod, merge in merges.items()}
    shrunk = family.finish(build_ids(family.rows, counts, pad_left))
    given = {}
    if family.mrope:
        anchors = {}
        for mod, merge in merges.items():
            anchors |= anchor_columns(family, batch["input_ids"], mod, merge)
        given["position_ids"] = expected_positions(ref, batch, shrunk, anchors)
    elif positions_given:
        given["position_ids"] = caller_positions(ref, shrunk, family)
    mm = {mod: merge.features for mod, merge in merges.items()}
    return shrunk, given, mm, {mod: sum(c) for mod, c in counts.items()}


def check_merge_oracle(family: Family, pad_left: bool, positions_given: bool = False) -> None:
    """The patched model (merge mode, VTC only) on the family's batch: its shrunk inputs,
    positions (at the valid columns), logits and loss are the oracle's (module docstring).
    `positions_given`: the batch also carries the positions a collator would compute, which
    the patch must rebuild to the same answer."""
    model = family.make().train()
    ref = copy.deepcopy(model).eval()
    batch = family.batch(pad_left)
    if positions_given:
        batch["position_ids"] = caller_positions(ref, batch, family)
    out, last, report = run_patched(model, batch)
    shrunk, given, mm, kept = oracle_inputs(ref, family, batch, pad_left, positions_given)
    for name, value in shrunk.items():
        assert torch.equal(last[name], value), name
    valid = shrunk["attention_mask"].bool()
    if family.mrope:
        assert torch.equal(last["position_ids"][:, valid], given["position_ids"][:, valid])
    with torch.no_grad():
        expected = ref(**shrunk, **given, mm_encoder_outputs=mm)
    torch.testing.assert_close(out.logits[valid], expected.logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for mod, n in kept.items():
        assert getattr(report, f"{mod}_tokens_kept") == n, mod


@needs_encoder_outputs
@pytest.mark.parametrize(
    ("family", "pad_left", "positions_given"),
    [
        ("qwen2_5_vl", False, False),
        ("qwen2_5_vl", True, True),
        ("qwen3_vl", False, False),
        ("qwen3_vl", True, True),
        ("qwen3_vl_moe", True, False),
        ("glm4v_images", True, False),
        ("glm4v_moe_images", False, True),
        ("glm4v_video", False, False),
        ("glm4v_video", True, True),
        ("llava_onevision1_5", False, False),
        ("llava_onevision1_5", True, True),
    ],
)
def test_merge_equals_unpatched_on_hand_merged_features_and_anchor_positions(
    family, pad_left, positions_given
):
    check_merge_oracle(FAMILIES[family], pad_left, positions_given)
