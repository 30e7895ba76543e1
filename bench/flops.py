"""FLOP model of one training step of a vision-language model: vision tower -> projector ->
language model (LM), forward and backward, per training stage, dense or with STS.

Counting (a multiply-add is 2 FLOPs; norms, activations, softmax, RoPE, biases, embedding
lookups and the optimizer are left out):

    linear layer    2 * tokens * d_in * d_out forward.
    attention core  4 * T * S * H * d_head forward: Q K^T and P V for T queries over S keys
                    (S = T for full attention, the window's tokens for window attention). The
                    full T x T square, as SDPA's math path and the usual MFU accounting count
                    it, not the causal half a flash kernel computes.
    backward        a trained part: weight gradients (= its linear FLOPs) + input gradients
                    (= its linear FLOPs + 2x its attention core, whose both operands are
                    activations): 3x its forward in all. A frozen part after a trained one:
                    input gradients only. A frozen part with no trained part before it: none.
                    The first trained part's own input gradients are counted too (autograd
                    skips them for its first matmul: an overcount of at most one linear layer).
    LoRA            the frozen base as above plus rank-r adapters A [d_in, r], B [r, d_out] on
                    every linear layer of the LM's decoder layers, trained:
                    2 * tokens * r * (d_in + d_out) forward, 3x that in all.
    checkpointing   one more forward of the checkpointed parts wherever they run a backward:
                    the LM's decoder layers and the tower (its patch embedding, < 1% of it,
                    counted in).

STS: VTC shrinks the visual tokens the LM sees (after the projector / merger: the tower and
projector still see every token). LDS (sample mode) runs each LM decoder layer on a share of
the samples, which scales the decoder layers' FLOPs (forward, backward, recompute) by the
executed fraction, the mean over layers of 1 - p; the LM head still sees every token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PARTS = ("tower", "projector", "lm_attention", "lm_mlp", "lm_head")
# a part's position in the data flow (the LM's attention and MLP alternate: one group)
_GROUP_ORDER = {"tower": 0, "projector": 1, "lm_attention": 2, "lm_mlp": 2, "lm_head": 3}
_CHECKPOINTED = ("tower", "lm_attention", "lm_mlp")
MODES = ("trained", "frozen", "lora")


@dataclass(frozen=True)
class Blocks:
    """`layers` transformer blocks `hidden` wide: `heads` query heads and `kv_heads` key/value
    heads of `head_dim`, an MLP `intermediate` wide (gated = SwiGLU: 3 matrices, else 2)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool = True

    def linear_shapes(self, part: str) -> list[tuple[int, int]]:
        """(d_in, d_out) of each linear layer of one block's "attention" or "mlp"."""
        d, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        if part == "attention":  # q, k, v, o
            return [(d, q), (d, kv), (d, kv), (q, d)]
        return [(d, i)] * (2 if self.gated else 1) + [(i, d)]

    def linear_flops(self, part: str, tokens: float) -> float:
        """Forward FLOPs of one block's linear layers of `part` over `tokens`."""
        return 2 * tokens * sum(a * b for a, b in self.linear_shapes(part))

    def lora_flops(self, part: str, tokens: float, rank: int) -> float:
        """Forward FLOPs of rank-`rank` adapters on every linear layer of `part`."""
        return 2 * tokens * rank * sum(a + b for a, b in self.linear_shapes(part))

    def core_flops(self, queries: float, keys: float) -> float:
        """Q K^T and P V of one block: 4 * queries * keys * heads * head_dim."""
        return 4 * queries * keys * self.heads * self.head_dim


@dataclass(frozen=True)
class Tower:
    """A ViT: `patch` x `patch` pixel patches of `patch_inputs` values (channels x frames x
    patch^2) embedded into `blocks`, plus `extra_tokens` (CLS) that run through the blocks but
    not into the projector. `merge` x `merge` patches make one visual token (Qwen's merger).
    Window attention (`window` > 0, in visual tokens per side) in every block except
    `full_layers`."""

    blocks: Blocks
    patch: int
    patch_inputs: int
    extra_tokens: int = 0
    merge: int = 1
    window: int = 0
    full_layers: tuple[int, ...] = ()

    def grid(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an image, each side a multiple of `merge`."""
        step = self.patch * self.merge
        return tuple(max(1, side // step) * self.merge for side in resolution)

    def visual_grid(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Grid of the visual tokens the projector outputs."""
        return tuple(side // self.merge for side in self.grid(resolution))

    def visual_tokens(self, resolution: tuple[int, int]) -> int:
        h, w = self.visual_grid(resolution)
        return h * w

    def window_sizes(self, resolution: tuple[int, int]) -> list[int]:
        """Patches in each attention window: `window` x `window` visual tokens from the top
        left, the last row / column of windows cut by the grid's edge."""
        sides = [
            [min(self.window, n - s) * self.merge for s in range(0, n, self.window)]
            for n in self.visual_grid(resolution)
        ]
        return [a * b for a in sides[0] for b in sides[1]]

    def forward_flops(self, resolution: tuple[int, int]) -> tuple[float, float]:
        """(linear, attention core) forward FLOPs for one image."""
        gh, gw = self.grid(resolution)
        n = gh * gw + self.extra_tokens
        b = self.blocks
        linear = 2 * gh * gw * self.patch_inputs * b.hidden  # the patch embedding
        linear += b.layers * (b.linear_flops("attention", n) + b.linear_flops("mlp", n))
        full = b.core_flops(n, n)
        if self.window:
            windowed = sum(b.core_flops(k, k) for k in self.window_sizes(resolution))
            n_full = sum(1 for i in range(b.layers) if i in self.full_layers)
            return linear, n_full * full + (b.layers - n_full) * windowed
        return linear, b.layers * full


@dataclass(frozen=True)
class Vlm:
    """Tower -> projector (linear layers of widths `projector[0] -> [1] -> ...`, per visual
    token) -> LM `blocks` -> head onto `vocab`. A text-only LM has no tower and projector."""

    lm: Blocks
    vocab: int
    tower: Tower | None = None
    projector: tuple[int, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class Workload:
    """One step's batch: `batch` samples of `images` images (`resolution` = (H, W) pixels) and
    `text_tokens` other tokens each."""

    batch: int
    text_tokens: int
    images: int = 0
    resolution: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Training:
    """What a stage trains: each of tower / projector / LM is "trained", "frozen" or "lora"
    (LM only: frozen base + rank-`lora_rank` adapters); the LM head is trained with the LM."""

    tower: str = "trained"
    projector: str = "trained"
    lm: str = "trained"
    lora_rank: int = 0
    checkpointing: bool = False

    def mode(self, part: str) -> str:
        if part in ("tower", "projector"):
            return getattr(self, part)
        if part == "lm_head":
            return "trained" if self.lm == "trained" else "frozen"
        return self.lm


STAGES = {
    "align": Training(tower="frozen", projector="trained", lm="frozen"),
    "instruct": Training(tower="frozen", projector="trained", lm="trained"),
    "lora": Training(tower="frozen", projector="trained", lm="lora", lora_rank=128),
    "full": Training(),
}


@dataclass(frozen=True)
class Sparsity:
    """What STS leaves: visual tokens the LM sees per image (None: all) and the executed
    fraction of the LM decoder layers' rows."""

    visual_tokens: float | None = None
    layer_fraction: float = 1.0


DENSE = Sparsity()


@dataclass(frozen=True)
class PartFlops:
    """One part's FLOPs in a step: forward, backward and checkpointing's recompute."""

    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


@dataclass(frozen=True)
class _Forward:
    linear: float = 0.0
    core: float = 0.0
    adapters: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.core + self.adapters


def lm_tokens(model: Vlm, work: Workload, sparsity: Sparsity = DENSE) -> float:
    """Tokens per sample the LM runs on: text + images x visual tokens kept."""
    if model.tower is None or not work.images:
        return work.text_tokens
    visual = sparsity.visual_tokens
    if visual is None:
        visual = model.tower.visual_tokens(work.resolution)
    return work.text_tokens + work.images * visual


def forward_flops(model: Vlm, work: Workload, training: Training, sparsity: Sparsity) -> dict:
    """{part: _Forward} for the whole batch."""
    out = {}
    if model.tower is not None and work.images:
        images = work.batch * work.images
        linear, core = model.tower.forward_flops(work.resolution)
        out["tower"] = _Forward(images * linear, images * core)
        widths = model.projector
        tokens = images * model.tower.visual_tokens(work.resolution)
        out["projector"] = _Forward(2 * tokens * sum(a * b for a, b in zip(widths, widths[1:])))
    t, b, lm = lm_tokens(model, work, sparsity), work.batch, model.lm
    rows = b * lm.layers * sparsity.layer_fraction  # sample-rows the decoder layers run
    rank = training.lora_rank if training.lm == "lora" else 0
    for part, core in (("attention", lm.core_flops(t, t)), ("mlp", 0.0)):
        out[f"lm_{part}"] = _Forward(
            rows * lm.linear_flops(part, t), rows * core, rows * lm.lora_flops(part, t, rank)
        )
    out["lm_head"] = _Forward(2 * b * t * lm.hidden * model.vocab)
    return out


def step_flops(
    model: Vlm, work: Workload, training: Training, sparsity: Sparsity = DENSE
) -> dict[str, PartFlops]:
    """{part: PartFlops} of one training step (module docstring for the rules)."""
    forward = forward_flops(model, work, training, sparsity)
    trained_groups = {_GROUP_ORDER[p] for p in forward if training.mode(p) != "frozen"}
    out = {}
    for part, f in forward.items():
        mode = training.mode(part)
        if mode not in MODES:
            raise ValueError(f"{part}: mode must be one of {MODES}, got {mode!r}")
        upstream = any(g < _GROUP_ORDER[part] for g in trained_groups)
        if mode == "frozen" and not upstream:
            out[part] = PartFlops(f.total)
            continue
        backward = f.linear + 2 * f.core + 2 * f.adapters  # input grads (+ adapters' weights)
        if mode == "trained":
            backward += f.linear  # weight gradients
        recompute = f.total if training.checkpointing and part in _CHECKPOINTED else 0.0
        out[part] = PartFlops(f.total, backward, recompute)
    return out


def total(flops: dict[str, PartFlops], recompute: bool = True) -> float:
    """Sum over parts; `recompute=False` leaves checkpointing's recompute out (model FLOPs as
    MFU counts them)."""
    return sum(p.forward + p.backward + (p.recompute if recompute else 0.0) for p in flops.values())


# ---- STS options -> Sparsity (the package's own modules decide) ---------------------------

SETTINGS = ("dense", "vtc", "lds", "vtc+lds")


@dataclass(frozen=True)
class StsOptions:
    """VTC: `vtc` "pool" (window x window) or "merge" (keep `ratio` of the tokens); LDS: the
    sample-mode schedule policy, deepest eligible layer skipping with `p_max`."""

    vtc: str = "pool"
    window: int = 2
    ratio: float = 0.5
    p_max: float = 0.5
    keep_first_last: bool = True

    def compress(self) -> dict:
        """apply_sts `compress` arguments."""
        if self.vtc == "pool":
            return {"mode": "pool", "window": (self.window, self.window)}
        return {"mode": "merge", "ratio": self.ratio}

    def skip(self) -> dict:
        """apply_sts `skip` arguments."""
        return {"policy": "schedule", "p_max": self.p_max, "keep_first_last": self.keep_first_last}


def visual_tokens_kept(model: Vlm, work: Workload, options: StsOptions) -> int:
    """Visual tokens per image after VTC, as `VisualTokenCompressor.output_tokens` says."""
    from sts_kernels.nn import VisualTokenCompressor

    n = model.tower.visual_tokens(work.resolution)
    grid = model.tower.visual_grid(work.resolution)
    return VisualTokenCompressor(**options.compress()).output_tokens(n, grid)


def expected_layer_fraction(layers: int, options: StsOptions) -> float:
    """Mean over the LM's layers of 1 - p, p from `LayerDynamicSkipper.skip_probabilities`
    (schedule: the j-th of n eligible layers skips with p = p_max * j / n)."""
    from torch import nn

    from sts_kernels.nn import LayerDynamicSkipper

    stack = nn.ModuleList(nn.Identity() for _ in range(layers))
    skipper = LayerDynamicSkipper(
        stack, 1, p_max=options.p_max, keep_first_last=options.keep_first_last
    )
    return 1.0 - skipper.skip_probabilities().mean().item()


def expected_sparsity(setting: str, model: Vlm, work: Workload, options: StsOptions) -> Sparsity:
    """The Sparsity a setting of SETTINGS projects to."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    sparsity = DENSE
    if "vtc" in setting and model.tower is not None and work.images:
        sparsity = replace(sparsity, visual_tokens=visual_tokens_kept(model, work, options))
    if "lds" in setting:
        sparsity = replace(
            sparsity, layer_fraction=expected_layer_fraction(model.lm.layers, options)
        )
    return sparsity


# ---- Hugging Face configs -> Vlm ---------------------------------------------------------


def _lm_blocks(text) -> Blocks:
    """Llama / Qwen2-style decoder (SwiGLU MLP, grouped-query attention)."""
    heads = text.num_attention_heads
    return Blocks(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
    )


def _clip_tower(vision, select_strategy: str) -> Tower:
    d, heads = vision.hidden_size, vision.num_attention_heads
    blocks = Blocks(
        vision.num_hidden_layers, d, heads, heads, d // heads, vision.intermediate_size, gated=False
    )
    inputs = vision.num_channels * vision.patch_size**2
    if select_strategy != "default":  # "default" drops CLS before the projector
        raise ValueError(f"vision_feature_select_strategy {select_strategy!r}: not modelled")
    return Tower(blocks, vision.patch_size, inputs, extra_tokens=1)


def _qwen_tower(vision) -> Tower:
    d, heads, p, m = (
        vision.hidden_size,
        vision.num_heads,
        vision.patch_size,
        vision.spatial_merge_size,
    )
    blocks = Blocks(vision.depth, d, heads, heads, d // heads, vision.intermediate_size)
    return Tower(
        blocks,
        patch=p,
        patch_inputs=vision.in_channels * vision.temporal_patch_size * p * p,
        merge=m,
        window=vision.window_size // (p * m),
        full_layers=tuple(vision.fullatt_block_indexes),
    )


def from_hf_config(config) -> Vlm:
    """The Vlm of a transformers config: LLaVA (CLIP tower, MLP projector, Llama-style LM),
    Qwen2.5-VL (window-attention tower, 2x2 merger, Qwen2 LM) or a text-only decoder."""
    kind = config.model_type
    if kind == "llava":
        if config.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"LLaVA with a {config.vision_config.model_type} tower: not modelled")
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        d = config.text_config.hidden_size
        tower = _clip_tower(config.vision_config, config.vision_feature_select_strategy)
        widths = (tower.blocks.hidden * n_layers, d, d)
        return Vlm(
            _lm_blocks(config.text_config), config.text_config.vocab_size, tower, widths, kind
        )
    if kind == "qwen2_5_vl":
        tower = _qwen_tower(config.vision_config)
        merged = tower.blocks.hidden * tower.merge**2
        widths = (merged, merged, config.vision_config.out_hidden_size)
        return Vlm(
            _lm_blocks(config.text_config), config.text_config.vocab_size, tower, widths, kind
        )
    if hasattr(config, "num_hidden_layers") and hasattr(config, "intermediate_size"):
        return Vlm(_lm_blocks(config), config.vocab_size, name=kind)
    raise ValueError(f"no FLOP model for model_type {kind!r} (LLaVA, Qwen2.5-VL or a decoder LM)")


def ratio(model: Vlm, work: Workload, training: Training, sparsity: Sparsity) -> float:
    """Projected step-time ratio to dense: FLOPs with `sparsity` over dense FLOPs."""
    return total(step_flops(model, work, training, sparsity)) / total(
        step_flops(model, work, training)
    )
