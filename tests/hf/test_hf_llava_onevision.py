"""apply_sts on a tiny LLaVA-OneVision: capped anyres crops, base-only images of multi-image
rows, videos closed by a newline token."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    ONEVISION_ROWS,
    build_ids,
    llava_next_reference_pack,
    llava_onevision_batch,
    make_llava_onevision,
    needs_encoder_outputs,
)

from sts_kernels import token_pool  # noqa: E402
from sts_kernels.integrations.hf import apply_sts  # noqa: E402


@needs_encoder_outputs
@pytest.mark.parametrize("pad_left", [False, True])
def test_images_and_videos_equal_unpatched_on_reference_features(pad_left):
    model = make_llava_onevision("eager")
    ref = copy.deepcopy(model)
    batch = llava_onevision_batch(model, pad_left)
    handle = apply_sts(model, stage="align")
    out = model(**batch)

    with torch.no_grad():
        images = ref.model.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
            return_dict=True,
        )
        newline = ref.model.image_newline
        packed = list(images.pooler_output)  # anyres (32, 64): crops 4x8 capped to 2x5
        assert [len(f) for f in packed] == [16 + 2 * 6, 17, 17]
        base_only = [
            torch.cat([token_pool(f[None, :16], (4, 4), (2, 2))[0], f[16:]]) for f in packed[1:]
        ]
        images.pooler_output = [llava_next_reference_pack(packed[0], newline, (2, 5)), *base_only]
        videos = ref.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
        frames = token_pool(videos.pooler_output[:, :-1].reshape(8, 4, -1), (2, 2), (2, 2))
        videos.pooler_output = torch.cat([frames.view(2, 4, -1), videos.pooler_output[:, -1:]], 1)
    kept = {"image": [len(f) for f in images.pooler_output], "video": [5, 5]}
    shrunk = build_ids(ONEVISION_ROWS, kept, pad_left)
    del shrunk["mm_token_type_ids"]
    expected = ref(
        **shrunk,
        batch_num_images=batch["batch_num_images"],
        mm_encoder_outputs={"image": images, "video": videos},
    )
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for name, value in shrunk.items():
        assert torch.equal(handle.last_inputs[name], value), name
    # anyres: base 2x2 + crops 2x5 -> one row of 3 and a newline; base-only: 2x2 + newline
    assert handle.report.image_tokens_kept == (4 + 1 * (3 + 1)) + 2 * (4 + 1)
    handle.remove()
