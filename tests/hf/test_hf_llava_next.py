"""apply_sts on a tiny LLaVA-NeXT: anyres base + crops, image_newline kept at every row end."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    LLAVA_ROWS,
    build_ids,
    frozen_features,
    llava_next_batch,
    llava_next_merge_pack,
    llava_next_reference_pack,
    make_llava_next,
    needs_encoder_outputs,
)
from kernel_count import count_kernels  # noqa: E402

from sts_kernels.integrations.hf import apply_sts  # noqa: E402
from sts_kernels.integrations.hf.adapters import adapter_for  # noqa: E402
from sts_kernels.nn import VisualTokenCompressor  # noqa: E402


def _unpatched_on(ref, batch, handle, pack, grids):
    """The unpatched model `ref` on the ids / masks / labels the patch fed the LM, with each
    image's unpatched features packed by hand (`pack(features, newline, crop grid)`): its
    output, and the unpacked features."""
    with torch.no_grad():
        feats = ref.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], return_dict=True
        )
        unpacked = list(feats.pooler_output)
        newline = ref.model.image_newline
        feats.pooler_output = [pack(f, newline, g) for f, g in zip(unpacked, grids)]
    shrunk = handle.last_inputs
    expected = ref(
        input_ids=shrunk["input_ids"],
        attention_mask=shrunk["attention_mask"],
        labels=shrunk["labels"],
        mm_encoder_outputs={"image": feats},
    )
    return expected, unpacked


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [False, True])
def test_vtc_equals_unpatched_on_reference_packed_features(pad_left):
    model = make_llava_next("eager")
    ref = copy.deepcopy(model)
    batch = llava_next_batch(model, pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)

    grids = [(4, 8), (8, 4), (6, 8)]  # unpadded crop grids of LLAVA_NEXT_SIZES
    expected, unpacked = _unpatched_on(ref, batch, handle, llava_next_reference_pack, grids)
    assert [f.shape[0] for f in unpacked] == [16 + h * (w + 1) for h, w in grids]
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    shrunk = handle.last_inputs  # the ids / masks the patch fed the model
    kept = [4 + -(-h // 2) * (-(-w // 2) + 1) for h, w in grids]
    assert handle.report.image_tokens_kept == sum(kept)
    for name, tensor in build_ids(LLAVA_ROWS, {"image": kept}, pad_left).items():
        if name != "mm_token_type_ids":
            assert torch.equal(shrunk[name], tensor), name
    handle.remove()


@needs_encoder_outputs
def test_merge_keeps_every_crop_row_and_its_newline():
    """Merge mode: the LM receives the merged base then every crop row merged on its own and
    ended by the newline (oracle: bipartite_merge run by hand on the unpatched features, fed
    to the unpatched model with the shrunk ids the patch used)."""
    model = make_llava_next("eager")
    ref = copy.deepcopy(model)
    batch = llava_next_batch(model, False)
    handle = apply_sts(model, compress={"mode": "merge", "ratio": 0.5}, skip=False)
    out = model(**batch)
    grids = [(4, 8), (8, 4), (6, 8)]  # unpadded crop grids of LLAVA_NEXT_SIZES
    expected, _ = _unpatched_on(ref, batch, handle, llava_next_merge_pack, grids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    kept = [8 + h * (w // 2 + 1) for h, w in grids]
    assert handle.report.image_tokens_kept == sum(kept)
    handle.remove()


@needs_encoder_outputs
def test_compressor_kernel_count_does_not_grow_with_images():
    model = make_llava_next()
    results = []
    for n in (2, 4):  # images of two crop grids
        sizes = [(32, 64), (48, 64)] * n
        batch = llava_next_batch(model, False, sizes=sizes, rows=[[[5], "image", [6]]] * 2 * n)
        with torch.no_grad():
            feats = model.model.get_image_features(
                batch["pixel_values"], batch["image_sizes"], return_dict=True
            )
        with frozen_features(model.model, "get_image_features", feats), count_kernels() as c:
            adapter_for(model).compress(model, VisualTokenCompressor(), dict(batch))
        results.append((c.kernels, c.syncs))
    assert results[0] == results[1], results
