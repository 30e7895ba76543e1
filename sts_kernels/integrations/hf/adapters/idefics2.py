"""Idefics2 (`Idefics2ForConditionalGeneration`): SigLIP features resampled by a perceiver into
`resampler_n_latents` latents per image (or crop), each run framed by
`<fake_token_around_image>`."""

from __future__ import annotations

from .smolvlm import SmolVLMAdapter


class Idefics2Adapter(SmolVLMAdapter):
    """SmolVLM's layout (`get_image_features` one `[images_i * n_latents, D]` per sample,
    padding images all zero, layers at `model.model.text_model.layers`), but the perceiver's
    latents are learned queries, not a spatial grid: there is nothing to pool 2x2. Bipartite
    merge needs no grid (each image's latents merged among themselves, in its own run: the
    inherited `compress` does it, tests/hf/test_hf_group_c.py checks it against a hand-run
    merge), but `apply_sts`'s default compressor pools, and a family without pool would refuse
    `apply_sts(model)`: merge is claimed once the default follows the family's first mode."""

    name = "Idefics2"
    classes = ("Idefics2ForConditionalGeneration",)
    modes = ("merge",)
    mode_reason = (
        "the perceiver resampler's latents are learned queries, not a spatial grid: merge only"
    )
    packs = True

    def tokens_per_tile(self, model):
        return model.config.perceiver_config.resampler_n_latents


ADAPTER = Idefics2Adapter()
