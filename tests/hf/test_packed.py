"""Packed (padding-free) rows, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) and
TRL's padding_free collator build them, for every family that packs: unpatched packed ==
unpacked (with the CPU flash-varlen oracle of tests/varlen_attention.py and with SDPA /
eager), and the same equalities under apply_sts (VTC, LDS token, LDS per segment, both; the
families of ROW_FAMILIES, whose samples are the rows of their tests/hf_models.py CASES batch:
VTC with token LDS and VTC with sample LDS; MERGE_FAMILIES: VTC merge with token LDS and with
sample LDS, the Qwen families and GLM-4V also with [3, 1, T] M-RoPE positions from the caller).
LFM2-VL's test shows why it does not pack.
The unpacked reference is each sample alone: loss = sum of per-sample summed losses / total
targets, which the packed row's mean loss equals exactly (each sample's first label is -100).

SDPA / eager run with use_cache=False: with the default use_cache=True a train forward builds
a DynamicCache and transformers' mask code then skips the packed-sequence detection from
position_ids, so samples attend to each other (flash varlen needs no mask and is unaffected).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from packed_batches import (  # noqa: E402
    EAGER,
    MAKERS,
    QWEN,
    ROW_CASES,
    family_class,
    pack,
    packed_loss,
    projector_grads,
    row_batch,
    samples,
    segments_of,
    summed_loss,
    unpacked_loss,
)
from varlen_attention import NAME, record, register  # noqa: E402

# the families of the full matrix; ROW_FAMILIES (cut from their CASES batch): a reduced one
ROW_FAMILIES = [f for f in ROW_CASES if f not in ("lfm2_vl",)]
FAMILIES = [f for f in MAKERS if f not in ROW_CASES]


def _model(family: str, attn: str):
    register()
    if attn == "ref":
        attn = "eager" if family in EAGER else "sdpa"
    model = MAKERS[family](attn=attn)
    if family in ("mistral3", "llava_pixtral") and attn == NAME:
        # the Pixtral tower sets its own per-image cu_seq_lens only under a "flash" name, else
        # a 4-D block mask (one block an image), which the oracle refuses: the tower runs SDPA
        # (the same blocks), the LM the oracle
        model.model.vision_tower.config._attn_implementation = "sdpa"
    model.train()
    return model


def _extra(attn: str) -> dict:
    return {} if attn == NAME else {"use_cache": False}


def _samples(family: str, model, attn: str) -> list[dict]:
    ss = samples(family, model)
    if family == "gemma3" and attn != NAME:
        # eager + token_type_ids + packed positions is wrong in transformers 5.25 itself
        # (test_gemma3_eager_token_types_packed); the oracle, like flash, ignores them
        ss = [{k: v for k, v in s.items() if k != "token_type_ids"} for s in ss]
    return ss


def _check_unpatched(model, ss, extra) -> None:
    packed = pack(ss, model)
    with torch.no_grad():
        outs, expected = unpacked_loss(model, ss, **extra)
        out, loss, own = packed_loss(model, packed, **extra)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(own, expected, rtol=1e-6, atol=1e-6)
    for seg, alone in zip(segments_of(packed), outs):
        torch.testing.assert_close(out.logits[:, seg], alone.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", [NAME, "ref"])
@pytest.mark.parametrize("family", FAMILIES + ROW_FAMILIES)
def test_unpatched_packed_equals_unpacked(family, attn):
    model = _model(family, attn)
    _check_unpatched(model, _samples(family, model, attn), _extra(attn))


def test_the_packed_column_claims_only_proven_families():
    """An adapter whose README "packed" cell says yes serves a class the packed tests above run
    (for the convention: DeepSeek-VL and GOT-OCR2); one that says "-" tells why."""
    from sts_kernels.integrations.hf.adapters import ADAPTERS, generic

    proven = {family_class(f) for f in FAMILIES + ROW_FAMILIES}
    served = {c for c in proven if c not in ADAPTERS}
    assert served == {"DeepseekVLForConditionalGeneration", "GotOcr2ForConditionalGeneration"}
    for adapter in [*dict.fromkeys(ADAPTERS.values()), generic.ADAPTER]:
        classes = set(adapter.classes) if adapter.classes else served
        assert not adapter.packs or classes & proven, adapter.name
        assert adapter.packs or adapter.packs_reason, adapter.name


def test_lfm2_vl_packed_rows_mix_samples():
    """Why LFM2-VL does not pack: its LM's short convolutions (causal_conv1d over the row, no
    segment reset) carry the previous sample's last tokens into the next sample's first ones,
    in the unpatched model itself: packed logits differ from each sample's alone."""
    model = _model("lfm2_vl", "ref")
    ss = samples("lfm2_vl", model)
    packed = pack(ss, model)
    with torch.no_grad():
        outs, _ = unpacked_loss(model, ss, use_cache=False)
        out = model(**packed, use_cache=False)
    first, *later = segments_of(packed)
    torch.testing.assert_close(out.logits[:, first], outs[0].logits, rtol=1e-5, atol=1e-5)
    for seg, alone in zip(later, outs[1:]):
        assert not torch.allclose(out.logits[:, seg], alone.logits, rtol=1e-3, atol=1e-3)


@pytest.mark.xfail(
    strict=False,
    reason="transformers 5.25: Gemma 3's sliding mask ORs the image blocks before the packed "
    "remap of positions, so the block ids are read at positions, not columns (future leaks)",
)
def test_gemma3_eager_token_types_packed():
    model = _model("gemma3", "ref")
    _check_unpatched(model, samples("gemma3", model), _extra("ref"))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_oracle_sees_the_segments(family):
    """Under the oracle every LM attention call of a packed row runs on the collator's 3
    segments and every tower call on its own inputs. LLaVA hands the text's cu_seq_lens to
    its CLIP tower (real flash varlen would apply them there); the Qwen towers, under a
    non-"flash" implementation name, split per image themselves and pass none."""
    model = _model(family, NAME)
    packed = pack(samples(family, model), model)
    with torch.no_grad(), record() as calls:
        model(**packed)
    lm = [c for c in calls if c["causal"]]
    assert lm and all(c["rule"] == "cu_seq_lens" and c["segments"] == 3 for c in lm), lm
    tower = [c for c in calls if not c["causal"]]
    assert tower and all(c["rule"] == "rows" for c in tower)
    handed = any("cu_seq_lens_q" in c["given"] for c in tower)
    assert handed == (family == "llava"), tower


# ---- patched: packed == unpacked with the same decisions -------------------------------------

VTC = {"mode": "pool", "window": (2, 2)}
SETTINGS = {
    "vtc": dict(compress=VTC, skip=False),
    "lds_token": dict(compress=False, skip={"mode": "token", "seed": 0, "p_max": 0.0}),
    "lds_sample": dict(compress=False, skip={"mode": "sample", "seed": 0, "p_max": 0.0}),
    "both": dict(compress=VTC, skip={"mode": "token", "seed": 0, "p_max": 0.0}),
}
SETTINGS["both_sample"] = dict(compress=VTC, skip=SETTINGS["lds_sample"]["skip"])
MERGE = {"mode": "merge", "ratio": 0.5}
SETTINGS["merge"] = dict(compress=MERGE, skip=SETTINGS["lds_token"]["skip"])
SETTINGS["merge_sample"] = dict(compress=MERGE, skip=SETTINGS["lds_sample"]["skip"])
# FAMILIES x the first four settings x (the varlen oracle, SDPA / eager); ROW_FAMILIES (a
# reduced matrix): VTC with token LDS, VTC with sample LDS
PATCHED_CASES = [(f, s, a) for f in FAMILIES for s in tuple(SETTINGS)[:4] for a in (NAME, "ref")]
PATCHED_CASES += [
    (f, s, a) for f in ROW_FAMILIES for s in ("both", "both_sample") for a in (NAME, "ref")
]
# merge mode (VTC merge by half + token / sample LDS): the M-RoPE families (merged tokens at
# their anchors' positions, the packed row's [4, 1, T] positions the caller's), GLM-4V's
# video row, row-wise merge (LLaVA-NeXT's crop rows, OneVision, Mistral 3's [IMG_BREAK] rows)
# and plain grids (LLaVA, InternVL); Idefics2 merges in the rows above
MERGE_FAMILIES = [
    "llava",
    "llava_next",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "glm4v",
    "glm4v_video",
    "llava_onevision",
    "mistral3",
]
PATCHED_CASES += [
    (f, s, a) for f in MERGE_FAMILIES for s in ("merge", "merge_sample") for a in (NAME, "ref")
]
# What fails them (seen): anchors read from the wrong item of the packed row (every item's
# from the row's first), no segments (the shrunk text row runs on across samples, stale
# cu_seq_lens). Not visible here, by design: M-RoPE rows of a packed sample offset by a
# constant (RoPE is relative, attention stays within the sample), and an anchor rule wrong
# alike packed and unpacked (tests/hf/test_qwen_merge.py checks the anchors themselves).
# families without pool: merge by half
MERGE_ONLY = {"idefics2": MERGE}


def _close_grads(got, want, name) -> None:
    """Gradients equal up to float32 summation order: 1e-5 of the gradient's scale."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=name)


def _grads_of(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    grads = projector_grads(model)
    model.zero_grad()
    return grads


@pytest.mark.parametrize(("family", "setting", "attn"), PATCHED_CASES)
def test_patched_packed_equals_unpacked(family, setting, attn):
    model = _model(family, attn)
    ss = _samples(family, model, attn)
    kwargs = SETTINGS[setting]
    if kwargs["compress"] and family in MERGE_ONLY:
        kwargs = kwargs | {"compress": MERGE_ONLY[family]}
    _check_patched(model, ss, pack(ss, model), kwargs, _extra(attn))


@pytest.mark.parametrize("setting", ["merge", "merge_sample"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_patched_packed_merge_with_3_row_mrope_positions(family, setting):
    """Merge on a packed row whose caller passes M-RoPE positions without the text row
    ([3, 1, T]: each sample's get_rope_index alone; the segments come from cu_seq_lens, so
    the varlen oracle only: SDPA reads packing from the text row) == the samples unpacked."""
    model = _model(family, NAME)
    ss = samples(family, model)
    packed = pack(ss, model)
    assert packed["position_ids"].shape[0] == 4
    packed["position_ids"] = packed["position_ids"][1:]
    _check_patched(model, ss, packed, SETTINGS[setting], _extra(NAME))


def _check_patched(model, ss: list[dict], packed: dict, kwargs: dict, extra: dict) -> None:
    """Under apply_sts(**kwargs): the packed row's loss (from its logits, and the model's own
    .loss) and projector gradients == the samples' unpacked; VTC keeps exactly the visual
    tokens it keeps of the samples alone, fewer than it was given, and the LM's row is as
    long as the samples' LM rows together, shorter than the packed row."""
    from sts_kernels.integrations.hf import apply_sts

    handle = apply_sts(model, **kwargs)
    try:
        outs, expected = unpacked_loss(model, ss, handle, **extra)
        want = _grads_of(model, expected)
        kept_alone = handle.totals.visual_tokens_kept
        handle.totals.reset()
        out, loss, own = packed_loss(model, packed, handle, **extra)
        got = _grads_of(model, loss)
        totals = handle.totals
        shrunk = handle.last_inputs["input_ids"].shape[1]
    finally:
        handle.remove()
    assert totals.visual_tokens_kept == kept_alone
    dropped = totals.visual_tokens_in - totals.visual_tokens_kept
    assert (dropped > 0) == bool(kwargs["compress"])  # VTC ran
    assert (shrunk < packed["input_ids"].shape[1]) == bool(kwargs["compress"])
    assert shrunk == sum(o.logits.shape[1] for o in outs)  # as short as the samples alone
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own, expected, rtol=1e-5, atol=1e-6)
    assert want and want.keys() == got.keys()
    for name in want:
        _close_grads(got[name], want[name], name)


def _text_positions(position_ids: torch.Tensor) -> torch.Tensor:
    return position_ids[0] if position_ids.ndim == 3 else position_ids  # [4, 1, T]: row 0


@pytest.mark.parametrize("mode", ["token", "sample"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_patched_packed_schedule_shrinks_segments(family, mode):
    """VTC + a skipper that skips (schedule, p_max=0.5): finite loss; the inputs that reach
    the LM carry cu_seq_lens_q / max_length_q recomputed for the shrunk row and positions
    restarting at 0 per segment, never negative."""
    from sts_kernels.integrations.hf import apply_sts

    model = _model(family, NAME)
    packed = pack(samples(family, model), model)
    skip = {"mode": mode, "policy": "schedule", "p_max": 0.5, "seed": 0}
    handle = apply_sts(model, compress=VTC, skip=skip)
    try:
        out = model(**packed)
        out.loss.backward()
        last = handle.last_inputs
    finally:
        handle.remove()
    assert torch.isfinite(out.loss)
    t = last["input_ids"].shape[1]
    assert t < packed["input_ids"].shape[1]
    cu = last["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == t and len(cu) == len(packed["cu_seq_lens_q"])
    assert torch.equal(last["cu_seq_lens_k"], last["cu_seq_lens_q"])
    assert last["max_length_q"] == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    pos = _text_positions(last["position_ids"])[0]
    assert (last["position_ids"] >= 0).all()
    for a, b in zip(cu[:-1], cu[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a)), (a, b, pos)


def test_patched_packed_llava_vtc_matches_hand_pooled_reference():
    """Independent VTC oracle: pool the unpatched model's projected features 2x2 per image by
    hand, build the short samples (4 placeholders an image), pack them and run the UNPATCHED
    model fed those features: the patched packed row gives the same logits and loss."""
    from hf_models import frozen_features

    from sts_kernels import token_pool
    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", NAME)
    ref = copy.deepcopy(model)
    packed = pack(samples("llava", model), model)
    with torch.no_grad():
        feats = ref.model.get_image_features(packed["pixel_values"], return_dict=True)
        feats.pooler_output = [
            token_pool(f.reshape(1, 16, -1), (4, 4), (2, 2))[0] for f in feats.pooler_output
        ]
    short = samples_with_tokens("llava", 4)
    short_packed = pack(short, ref)
    del short_packed["pixel_values"]
    with frozen_features(ref.model, "get_image_features", feats), torch.no_grad():
        expected = ref(**short_packed, pixel_values=packed["pixel_values"])
    want, n = summed_loss(expected.logits, short_packed["labels"])

    handle = apply_sts(model, compress=VTC, skip=False)
    try:
        with torch.no_grad():
            out = model(**packed)
        last = handle.last_inputs
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want / n, rtol=1e-6, atol=1e-6)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert torch.equal(last[key].to(short_packed[key].dtype), short_packed[key]), key


def samples_with_tokens(family: str, tokens: int) -> list[dict]:
    """LLaVA's samples with `tokens` placeholders an image (the pooled layout)."""
    from hf_models import LLAVA_ROWS, build_ids, llava_batch

    assert family == "llava"
    out = []
    for row in LLAVA_ROWS:
        k = sum(part == "image" for part in row)
        if k:
            out.append(llava_batch(False, images=k, rows=[row], tokens=tokens))
        else:
            b = build_ids([row], {}, False)
            del b["mm_token_type_ids"]
            out.append(b)
    return out


# ---- TRL / transformers collators ----------------------------------------------------------


def _rows_for_collator(ss) -> list[dict]:
    return [
        {"input_ids": s["input_ids"][0].tolist(), "labels": s["labels"][0].tolist()} for s in ss
    ]


def test_flattening_collator_matches_pack():
    from transformers import DataCollatorWithFlattening

    model = _model("llava", NAME)
    ss = samples("llava", model)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(_rows_for_collator(ss))
    packed = pack(ss, model)
    assert "attention_mask" not in batch
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(batch[key], packed[key].to(batch[key].dtype)), key
    assert batch["max_length_q"] == packed["max_length_q"]


def test_trl_padding_free_collator_drops_pixels():
    """TRL 1.16's DataCollatorForLanguageModeling(padding_free=True) on pre-tokenized rows:
    flattened ids, positions, cu_seq_lens, seq_idx, and no pixel_values (it never reads them;
    SFTTrainer refuses padding_free for vision datasets)."""
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _model("llava", NAME)
    ss = samples("llava", model)
    rows = [r | {"pixel_values": s.get("pixel_values")} for r, s in zip(_rows_for_collator(ss), ss)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert "pixel_values" not in batch and "attention_mask" not in batch
    packed = pack(ss, model)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert torch.equal(batch[key], packed[key].to(batch[key].dtype)), (trl.__version__, key)


@pytest.mark.parametrize("collator", ["transformers", "trl"])
def test_patched_llava_on_collator_batch(collator):
    """A collator's packed batch (pixel_values added back) through the patched tiny LLaVA:
    the patched unpacked loss, and projector gradients."""
    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", NAME)
    ss = samples("llava", model)
    if collator == "trl":
        pytest.importorskip("trl")
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            _rows_for_collator(ss)
        )
    else:
        from transformers import DataCollatorWithFlattening

        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(_rows_for_collator(ss))
    batch["pixel_values"] = pack(ss, model)["pixel_values"]
    handle = apply_sts(model, compress=VTC, skip={"mode": "token", "seed": 0, "p_max": 0.0})
    try:
        _, expected = unpacked_loss(model, ss, handle)
        want = _grads_of(model, expected)
        out = model(**batch)
        got = _grads_of(model, out.loss)
    finally:
        handle.remove()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for name in want:
        _close_grads(got[name], want[name], name)


def test_placeholders_without_pixels_raise():
    """TRL's padding-free collator drops pixel_values: under the patch, image placeholders
    without pixel_values are a ValueError naming both (the unpatched model trains on the raw
    placeholder embeddings, silently)."""
    from transformers import DataCollatorWithFlattening

    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", NAME)
    ss = samples("llava", model)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(_rows_for_collator(ss))
    handle = apply_sts(model, compress=VTC, skip=False)
    try:
        with pytest.raises(ValueError, match="pixel_values") as err:
            model(**batch)
    finally:
        handle.remove()
    assert "placeholder" in str(err.value).lower() or "image token" in str(err.value).lower()


def test_qwen_packed_positions_are_mrope_rows():
    """[4, 1, T] packed Qwen positions: row 0 restarts per sample, rows 1-3 are each
    sample's get_rope_index alone (what the unpatched equality above relies on)."""
    model = _model("qwen2_vl", NAME)
    ss = samples("qwen2_vl", model)
    packed = pack(ss, model)
    pos = packed["position_ids"]
    assert pos.shape == (4, 1, packed["input_ids"].shape[1])
    for seg, s in zip(segments_of(packed), ss):
        assert torch.equal(pos[0, 0, seg], torch.arange(s["input_ids"].shape[1]))
    assert not torch.equal(pos[1], pos[0])  # the image rows differ from text positions
    assert QWEN


def _padded(ss: list[dict]) -> dict:
    """The samples as one right-padded batch (B = samples), visual inputs in order."""
    length = max(s["input_ids"].shape[1] for s in ss)

    def pad(key: str, fill: int) -> torch.Tensor:
        rows = [s[key] if key in s else torch.ones_like(s["input_ids"]) for s in ss]
        return torch.cat([F.pad(r, (0, length - r.shape[1]), value=fill) for r in rows])

    out = {"input_ids": pad("input_ids", 0), "labels": pad("labels", -100)}
    out["attention_mask"] = pad("attention_mask", 0)
    if "mm_token_type_ids" in ss[0]:
        out["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s[key] for s in ss if s.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


@pytest.mark.parametrize("policy", ["schedule", "importance"])
@pytest.mark.parametrize(
    ("family", "attn"),
    [
        ("llava", "ref"),
        ("qwen2_5_vl", "ref"),
        ("gemma3", NAME),
        ("llava_onevision", NAME),
        ("llama4", "ref"),
        ("glm4v", "ref"),
    ],
)
def test_packed_sample_mode_skips_per_packed_sample(family, attn, policy):
    """Sample mode on a packed row decides per packed sample: with the same seed the packed row
    draws the same decisions as the padded batch of its samples (one row each), so the summed
    losses and the projector's gradients are equal with real skipping (p_max 0.9), and the
    report counts samples, not rows."""
    from sts_kernels.integrations.hf import apply_sts

    model = _model(family, attn)
    ss = samples(family, model)
    skip = {"mode": "sample", "policy": policy, "p_max": 0.9, "target_skip": 0.6, "seed": 3}
    results = []
    padded = row_batch(family, model) if family in ROW_CASES else _padded(ss)
    for batch in (padded, pack(ss, model)):
        handle = apply_sts(model, compress=VTC, skip=skip | {"keep_first_last": False})
        try:
            out = model(**batch, use_cache=False)
            total, count = summed_loss(out.logits, handle.last_inputs["labels"])
            grads = _grads_of(model, total)
            report = handle.skipper.report
            results.append((total, count, grads, list(report.rows_run), list(report.rows_total)))
        finally:
            handle.remove()
    (want, n_want, g_want, run_want, tot_want), (got, n_got, g_got, run_got, tot_got) = results
    assert tot_got == tot_want == [len(ss)] * len(tot_got)
    assert run_got == run_want and 0 < sum(run_got) < sum(tot_got)  # some samples skipped
    assert n_got == n_want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in g_want:
        _close_grads(g_got[name], g_want[name], name)


def test_padded_positions_are_no_packing():
    """A padded batch with a mask and HF-style positions (cumsum - 1, padding 1) restarts its
    positions in the padding: not packing (transformers reads packing from positions only
    without a 2-D mask), so sample mode decides per row."""
    from hf_models import llava_batch

    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", "ref")
    batch = llava_batch(False)
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    handle = apply_sts(model, compress=VTC, skip={"mode": "sample", "p_max": 0.9, "seed": 0})
    model(**batch, use_cache=False).loss.backward()
    report = handle.skipper.report
    handle.remove()
    assert report.rows_total == [mask.shape[0]] * len(report.rows_total)


def _two_packed_rows(model, ss: list[dict]) -> dict:
    """Samples 0-1 packed in row 0, sample 2 in row 1 right-padded (pad id 0, positions
    restarting, labels -100), cu_seq_lens over B * T with the padding a segment of its own."""
    rows = [pack(ss[:2], model), pack(ss[2:], model)]
    length = max(r["input_ids"].shape[1] for r in rows)
    out, bounds = {"input_ids": [], "labels": [], "position_ids": []}, [0]
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        pad = length - n
        out["input_ids"].append(F.pad(r["input_ids"], (0, pad), value=0))
        out["labels"].append(F.pad(r["labels"], (0, pad), value=-100))
        out["position_ids"].append(torch.cat([r["position_ids"], torch.arange(pad)[None]], 1))
        ends = (r["cu_seq_lens_q"][1:] + i * length).tolist()
        bounds += ends + ([(i + 1) * length] if pad else [])
    out = {k: torch.cat(v) for k, v in out.items()}
    cu = torch.tensor(bounds, dtype=torch.int32)
    out |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    out |= {"max_length_q": int((cu[1:] - cu[:-1]).max()), "max_length_k": 0}
    out["max_length_k"] = out["max_length_q"]
    out["pixel_values"] = torch.cat([r["pixel_values"] for r in rows if "pixel_values" in r])
    return out


@pytest.mark.parametrize("compress", [False, VTC])
@pytest.mark.parametrize("with_cu", [True, False])
def test_packed_rows_padding_is_no_sample(compress, with_cu):
    """Two packed rows, the shorter right-padded: sample mode counts and draws the 3 samples
    only (padding, and VTC's re-padding, are no samples and never run)."""
    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", NAME)
    batch = _two_packed_rows(model, samples("llava", model))
    if not with_cu:
        batch = {k: v for k, v in batch.items() if not k.startswith(("cu_", "max_"))}
    skip = {"mode": "sample", "p_max": 0.9, "seed": 0, "keep_first_last": False}
    handle = apply_sts(model, compress=compress, skip=skip)
    loss = model(**batch).loss
    loss.backward()
    report = handle.skipper.report
    handle.remove()
    assert torch.isfinite(loss)
    assert report.rows_total == [3] * len(report.rows_total)


@pytest.mark.parametrize("attn", [NAME, "ref"])
def test_packed_rows_of_images_and_of_videos_both_shrink(attn):
    """Two packed rows (Qwen2-VL, [4, B, T] positions, cu_seq_lens over B * T), one holding an
    image sample, the other a video sample: the image shrink re-pads the image row; the video
    shrink then drops that re-padding (a segment of padding only) with the video row's
    placeholders, so the LM runs on the rows' own shrunk length, not the caller's; the loss is
    the samples' alone, patched."""
    from hf_models import V_END, V_START, qwen_batch

    from sts_kernels.integrations.hf import apply_sts

    model = _model("qwen2_vl", attn)
    image = qwen_batch(False, [(1, 8, 8)], [], rows=[[[5], [V_START], "image", [V_END], [20]]])
    video = qwen_batch(False, [], [(4, 4, 4)], rows=[[[6], [V_START], "video", [V_END], [22]]])
    rows = [pack([image], model), pack([video], model)]
    t = rows[0]["input_ids"].shape[1]  # both rows: 16 placeholders among 5 text tokens
    batch = {
        k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "mm_token_type_ids")
    }
    batch["position_ids"] = torch.cat([r["position_ids"] for r in rows], 1)
    cu = torch.tensor([0, t, 2 * t], dtype=torch.int32)
    batch |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": t, "max_length_k": t}
    batch |= {k: image[k] for k in ("pixel_values", "image_grid_thw")}
    batch |= {k: video[k] for k in ("pixel_values_videos", "video_grid_thw")}
    lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    handle = apply_sts(model, skip=False)
    try:
        _, loss, own = packed_loss(model, batch, handle, **_extra(attn))
        _, expected = unpacked_loss(model, [image, video], handle, **_extra(attn))
    finally:
        hook.remove()
        handle.remove()
    assert lengths[0] == (2, t - 12, lengths[0][2])  # each row: 16 placeholders pooled to 4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting",
    [
        {"compress": VTC, "skip": False},
        {"compress": False, "skip": {"mode": "sample", "p_max": 1e-6, "keep_first_last": False}},
    ],
    ids=["vtc", "sample"],
)
def test_a_sample_made_of_the_pad_id_is_no_padding(setting):
    """pad_token_id as a real token (as where pad == EOS): a packed sample made only of it,
    with targets, is a sample — VTC keeps its columns and LDS sample mode runs it — so the
    packed loss stays the samples' alone (a segment is padding only without targets)."""
    from sts_kernels.integrations.hf import apply_sts

    model = _model("llava", "ref")
    model.config.text_config.pad_token_id = 7
    ss = samples("llava", model)
    ids = torch.full((1, 4), 7)
    order = [ss[0], {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    order.append(ss[1])
    packed = pack(order, model)
    handle = apply_sts(model, **setting)
    try:
        with torch.no_grad():
            _, expected = unpacked_loss(model, order, handle, use_cache=False)
            _, loss, own = packed_loss(model, packed, handle, use_cache=False)
        runs = handle.report.rows_total
    finally:
        handle.remove()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own, expected, rtol=1e-5, atol=1e-6)
    if setting["skip"]:
        assert set(runs) == {3}, runs  # three samples at every layer
