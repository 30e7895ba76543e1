"""LayerDynamicSkipper: eval exactness, train output and gradients equal a dense computation
masked by the same decisions, sparse forward AND backward, token mode with positions, the
three policies, keep_first_last."""

import pytest
import torch
from tolerances import assert_close
from torch import nn

from sts_kernels import use_backend
from sts_kernels.nn import LayerDynamicSkipper, SkipReport
from sts_kernels.nn.skipper import MAX_SKIP

D = 8


class ResidualMLP(nn.Module):
    """y = x + scale * mlp(x) + shift[0]: per-sample extra args exercise the arg slicer."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.gain = gain
        self.forward_rows: list[tuple[int, ...]] = []  # leading (row) dims of x per call
        self.backward_rows: list[tuple[int, ...]] = []

    def forward(self, x, scale=None, shift=(None,)):
        self.forward_rows.append(tuple(x.shape[:-1]))
        h = self.mlp(x)
        if h.requires_grad:  # the gradient this layer's backward really sees
            h.register_hook(lambda g: self.backward_rows.append(tuple(g.shape[:-1])))
        h = self.gain * h
        if scale is not None:
            h = h * scale
        if shift[0] is not None:
            h = h + shift[0]
        return x + h


class ToyAttention(nn.Module):
    """Causal single-head attention over slots with an absolute position embedding."""

    def __init__(self, max_len: int = 16):
        super().__init__()
        self.pos = nn.Embedding(max_len, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, positions=None):
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        q, k, v = self.qkv(x + self.pos(positions)).chunk(3, dim=-1)
        # kept tokens are in original order and padding slots come last: a causal mask over
        # slots is causal over positions and never lets a kept token see padding
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(attn)


def make_layers(n=5, cls=ResidualMLP):
    torch.manual_seed(0)
    return nn.ModuleList(cls() for _ in range(n))


def masked_dense(layers, x, report, call=lambda layer, h: layer(h), gate_dtype=torch.float32):
    """The skipper's output recomputed densely: every layer on every row, then the rows the
    report says were skipped are reset to the input (and the kept ones gated)."""
    h = x
    for i, layer in enumerate(layers):
        y = call(layer, h)
        keep = report.keep_masks[i]
        if keep is None:
            h = y
            continue
        gate = torch.zeros(keep.shape, dtype=gate_dtype)
        gate[keep] = report.gates[i].to(gate_dtype)  # the report's gates follow the rows' order
        trailing = [1] * (h.dim() - keep.dim())
        h = torch.where(
            keep.view(*keep.shape, *trailing), h + gate.view(*keep.shape, *trailing) * (y - h), h
        )
    return h


@pytest.mark.parametrize("mode", ["sample", "token"])
@pytest.mark.parametrize("policy", ["schedule", "router", "importance"])
def test_eval_is_dense_and_exactly_the_unwrapped_layers(mode, policy):
    layers = make_layers()
    skipper = LayerDynamicSkipper(layers, D, mode=mode, policy=policy, seed=0).eval()
    x = torch.randn(4, 6, D)
    expected = x
    for layer in layers:
        expected = layer(expected)
    assert torch.equal(skipper(x), expected)
    assert all(
        len(layer.forward_rows) == 2 and layer.forward_rows[-1] == (4, 6) for layer in layers
    )


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_train_output_and_grads_equal_masked_dense(mode):
    layers = make_layers()
    skipper = LayerDynamicSkipper(layers, D, mode=mode, p_max=0.6, seed=3).train()
    x = torch.randn(8, 5, D, requires_grad=True)
    w = torch.randn(8, 5, D)
    scale = torch.rand(8, 1, 1) + 0.5  # per-sample: sliced in sample mode
    shift = (torch.randn(1, 5, D),)  # broadcast dim 0 of 1: passes unchanged
    kwargs = dict(scale=scale, shift=shift) if mode == "sample" else {}
    out = skipper(x, **kwargs)
    report = skipper.report
    assert report.keep_masks[0] is None and report.keep_masks[-1] is None
    skipped_somewhere = [m for m in report.keep_masks if m is not None and not m.all()]
    assert skipped_somewhere, "no row was skipped: the test would prove nothing"
    (out * w).sum().backward()
    got_x = x.grad.clone()
    got_params = [p.grad.clone() for p in layers.parameters()]

    layers.zero_grad()
    x.grad = None
    expected = masked_dense(layers, x, report, lambda layer, h: layer(h, **kwargs))
    assert_close(out, expected)
    (expected * w).sum().backward()
    assert_close(got_x, x.grad, name="grad x")
    for got, want in zip(got_params, (p.grad for p in layers.parameters())):
        assert_close(got, want, name="grad param")


def test_same_seed_same_decisions_other_seed_others():
    def masks(seed):
        skipper = LayerDynamicSkipper(make_layers(), D, p_max=0.5, seed=seed).train()
        skipper(torch.randn(32, 2, D))
        return [m for m in skipper.report.keep_masks if m is not None]

    assert all(torch.equal(a, b) for a, b in zip(masks(1), masks(1)))
    assert not all(torch.equal(a, b) for a, b in zip(masks(1), masks(2)))


def test_skipped_rows_get_residual_gradient_only():
    layers = make_layers(1)
    skipper = LayerDynamicSkipper(layers, D, p_max=0.5, keep_first_last=False, seed=0).train()
    x = torch.randn(16, 3, D, requires_grad=True)
    w = torch.randn(16, 3, D)
    (skipper(x) * w).sum().backward()
    keep = skipper.report.keep_masks[0]
    assert 0 < keep.sum() < 16
    assert torch.equal(x.grad[~keep], w[~keep])  # the identity path, nothing through the layer
    assert not torch.allclose(x.grad[keep], w[keep])


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_layer_forward_and_backward_see_only_kept_rows(mode):
    layers = make_layers(4)
    skipper = LayerDynamicSkipper(layers, D, mode=mode, p_max=0.7, seed=0).train()
    x = torch.randn(12, 5, D, requires_grad=True)
    skipper(x).sum().backward()
    report = skipper.report
    for i, layer in enumerate(layers):
        keep = report.keep_masks[i]
        if keep is None:
            expected = (12, 5)
        elif mode == "sample":
            expected = (report.rows_run[i], 5)  # [K, T, D]
        else:
            expected = (12, int(keep.sum(1).max()))  # padded [B, Kmax, D]
        assert layer.forward_rows == [expected]
        assert layer.backward_rows == [expected]
    assert any(rows != [(12, 5)] for rows in (layer.forward_rows for layer in layers))
    sparse = [i for i in range(4) if report.keep_masks[i] is not None]
    assert sparse and all(report.rows_run[i] < report.rows_total[i] for i in sparse)
    assert report.executed_fraction < 1.0


def test_expected_output_equals_dense():
    """Stochastic-depth rescale: averaging over many draws gives the dense layer."""
    layers = make_layers(1)
    skipper = LayerDynamicSkipper(layers, D, p_max=0.5, keep_first_last=False, seed=0).train()
    x = torch.randn(1, 1, D).expand(8192, 1, D)
    delta = (layers[0](x[:1]) - x[:1]).detach()
    mean = skipper(x).detach().mean(0, keepdim=True)
    # out = x + 2 * Bernoulli(0.5) * delta: std of the mean is |delta| / sqrt(8192)
    assert torch.allclose(mean, x[:1] + delta, atol=float(5 * delta.abs().max() / 8192**0.5))


def test_token_mode_attention_uses_kept_tokens_and_original_positions():
    layers = make_layers(1, ToyAttention)
    skipper = LayerDynamicSkipper(
        layers, D, mode="token", p_max=0.5, keep_first_last=False, seed=1
    ).train()
    x = torch.randn(3, 10, D)
    out = skipper(x)
    keep, gate = skipper.report.keep_masks[0], skipper.report.gates[0]
    assert 0 < keep.sum() < 30
    expected = x.clone()
    k = 0
    for b in range(3):
        t = keep[b].nonzero().squeeze(1)
        if t.numel():
            y = layers[0](x[b, t][None], positions=t[None])[0]  # the kept tokens alone
            g = gate[k : k + t.numel(), None]
            expected[b, t] = x[b, t] + g * (y - x[b, t])
            k += t.numel()
    assert_close(out, expected)


def test_router_top_k_gate_and_gradient():
    layers = make_layers(4)
    skipper = LayerDynamicSkipper(layers, D, policy="router", capacity=0.25).train()
    x = torch.randn(8, 3, D)
    skipper(x).square().sum().backward()
    for i in (1, 2):  # the eligible layers
        keep = skipper.report.keep_masks[i]
        assert keep.sum() == 2  # round(0.25 * 8)
        assert skipper.routers[str(i)].weight.grad.abs().sum() > 0
        # straight-through: the forward value is exactly 1 (the kept rows run as in eval)
        assert torch.equal(skipper.report.gates[i], torch.ones(2))
    assert set(skipper.routers) == {"1", "2"}


@pytest.mark.parametrize("mode", ["sample", "token"])
def test_router_at_full_capacity_trains_what_eval_runs(mode):
    """Capacity 1.0: every row runs every layer, so the training output must be the eval
    output (STS evaluates densely), while the router still gets a gradient through the
    straight-through gate (a sigmoid gate would scale the layers' updates by ~0.5)."""
    layers = make_layers(4)
    skipper = LayerDynamicSkipper(layers, D, mode=mode, policy="router", capacity=1.0)
    x = torch.randn(4, 5, D)
    train_out = skipper.train()(x)
    with torch.no_grad():
        eval_out = skipper.eval()(x)
    assert_close(train_out, eval_out)
    train_out.square().sum().backward()
    for i in (1, 2):
        assert skipper.routers[str(i)].weight.grad.abs().sum() > 0


def test_gates_follow_the_model_dtype():
    """fp64 models get fp64 gates (no fp32 rounding of 1 / keep_prob); half models fp32."""
    layers = make_layers(3).double()
    skipper = LayerDynamicSkipper(layers, D, p_max=0.7, seed=0).train()
    x = torch.randn(16, 2, D, dtype=torch.float64)
    out = skipper(x)
    assert skipper.report.gates[1].dtype == torch.float64
    expected = masked_dense(layers, x, skipper.report, gate_dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert skipper.gate_of_plan(2.0, route_all(4), torch.bfloat16).dtype == torch.float32


def route_all(n):
    from sts_kernels import route

    return route(torch.ones(n, dtype=torch.bool))


def test_fully_skipped_layer_gives_every_parameter_a_zero_gradient():
    """DDP with find_unused_parameters=False needs a gradient for every parameter on every
    rank: a layer no row runs joins the graph at zero cost and gets exact zeros."""
    layers = make_layers(3)
    skipper = LayerDynamicSkipper(layers, D, policy="router", capacity=0.0).train()
    x = torch.randn(4, 2, D, requires_grad=True)
    out = skipper(x)
    assert skipper.report.rows_run[1] == 0 and len(layers[1].forward_rows) == 0
    out.sum().backward()
    for p in layers[1].parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert all(p.grad is not None for p in skipper.parameters())
    assert torch.equal(out, layers[2](layers[0](x)))


def test_router_token_mode_top_k_per_sample():
    skipper = LayerDynamicSkipper(make_layers(3), D, mode="token", policy="router").train()
    skipper(torch.randn(4, 6, D))
    assert skipper.report.keep_masks[1].sum(1).tolist() == [3, 3, 3, 3]


def test_router_capacity_all_and_none():
    layers = make_layers(3)
    x = torch.randn(4, 2, D)
    full = LayerDynamicSkipper(layers, D, policy="router", capacity=1.0).train()
    out = full(x)
    gate = full.report.gates[1].view(4, 1, 1)
    h = layers[0](x)
    assert_close(out, layers[2](h + gate * (layers[1](h) - h)))  # dense, still gated
    assert layers[1].forward_rows[-1] == (4, 2)
    none = LayerDynamicSkipper(layers, D, policy="router", capacity=0.0).train()
    calls = len(layers[1].forward_rows)
    assert torch.equal(none(x), layers[2](layers[0](x)))
    assert len(layers[1].forward_rows) == calls  # the fully skipped layer was never called
    assert none.report.rows_run[1] == 0


def test_router_keeps_a_row_of_a_single_sample_batch():
    layers = make_layers(3)
    skipper = LayerDynamicSkipper(layers, D, policy="router", capacity=0.5).train()
    skipper(torch.randn(1, 2, D)).sum().backward()  # round(0.5 * 1) would be 0
    assert skipper.report.rows_run[1] == 1
    assert skipper.routers["1"].weight.grad.abs().sum() > 0


def test_schedule_probabilities_rise_linearly_and_keep_first_last():
    skipper = LayerDynamicSkipper(make_layers(6), D, p_max=0.8)
    probs = skipper.skip_probabilities()
    assert_close(probs, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 0.0]))
    loose = LayerDynamicSkipper(make_layers(4), D, p_max=0.8, keep_first_last=False, seed=0)
    assert_close(loose.skip_probabilities(), torch.tensor([0.2, 0.4, 0.6, 0.8]))
    loose.train()(torch.randn(16, 2, D))
    assert all(m is not None for m in loose.report.keep_masks)
    assert all(g.unique().numel() == 1 for g in loose.report.gates)
    assert_close(loose.report.gates[3][0], torch.tensor(1 / 0.2))


def test_importance_skips_the_layer_that_changes_least():
    torch.manual_seed(0)
    layers = nn.ModuleList(ResidualMLP(gain) for gain in (1.0, 1.0, 1e-3, 1.0, 1.0, 1.0))
    skipper = LayerDynamicSkipper(
        layers, D, policy="importance", target_skip=0.3, ema=0.5, seed=0
    ).train()
    probs = skipper.skip_probabilities()
    assert_close(probs[1:5], torch.full((4,), 0.3))  # nothing measured yet: uniform
    for _ in range(4):
        skipper(torch.randn(16, 2, D))
    assert (skipper.change_updates[1:5] > 0).all() and (skipper.change_updates[[0, 5]] == 0).all()
    probs = skipper.skip_probabilities()
    assert probs[2] == probs.max() and probs[2] <= MAX_SKIP + 1e-6
    assert_close(probs[1:5].mean(), torch.tensor(0.3))  # the budget holds
    assert probs[0] == 0 and probs[5] == 0
    # a pass draws every layer with the probabilities of its first eligible layer
    skipper(torch.randn(16, 2, D))
    assert torch.equal(skipper._pass_probabilities, probs)


def test_tuple_outputs_pass_through():
    class TupleLayer(ResidualMLP):
        def forward(self, x):
            return super().forward(x), "aux"

    layers = make_layers(3, TupleLayer)
    skipper = LayerDynamicSkipper(layers, D, p_max=0.5, seed=0).train()
    out = skipper.layers[1](torch.randn(8, 2, D))
    assert 0 < skipper.report.rows_run[1] < 8
    assert isinstance(out, tuple) and out[1] == "aux" and out[0].shape == (8, 2, D)


def test_report_is_a_skipreport():
    skipper = LayerDynamicSkipper(make_layers(3), D, seed=0).train()
    skipper(torch.randn(4, 2, D))
    assert isinstance(skipper.report, SkipReport)
    assert skipper.report.rows_total == [4, 4, 4]
    assert 0 < skipper.report.executed_fraction <= 1


@pytest.mark.parametrize("bad", [dict(mode="layer"), dict(policy="random"), dict(p_max=1.0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LayerDynamicSkipper(make_layers(2), D, **bad)


@pytest.mark.interpreter
def test_token_mode_with_triton_skip_residual():
    layers = make_layers(3)
    skipper = LayerDynamicSkipper(layers, D, mode="token", p_max=0.5, seed=0).train()
    x = torch.randn(4, 6, D, requires_grad=True)
    with use_backend("triton"):
        out = skipper(x)
    expected = masked_dense(layers, x, skipper.report)
    assert_close(out, expected)


def test_token_mode_default_builder_runs_hf_decoder_layers():
    """Outside apply_sts, a token-mode skipper around HF decoder layers needs no builder: rotary
    embeddings, position ids and the causal mask are cut to each sample's kept tokens."""
    pytest.importorskip("transformers")
    from hf_models import llama_config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = llama_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0)
    skipper = LayerDynamicSkipper(
        nn.ModuleList([layer]), 32, mode="token", p_max=0.5, keep_first_last=False, seed=1
    ).train()
    x = torch.randn(3, 8, 32)
    positions = torch.arange(8)[None].expand(3, -1)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    out = skipper(x, position_embeddings=(cos, sin), position_ids=positions)
    keep, gate = skipper.report.keep_masks[0], skipper.report.gates[0]
    assert 0 < keep.sum() < keep.numel()
    expected, k = x.clone(), 0
    for b in range(3):
        t = keep[b].nonzero().squeeze(1)
        if t.numel():  # the kept tokens alone, at their original positions
            y = layer(
                x[b, t][None],
                position_embeddings=(cos[b, t][None], sin[b, t][None]),
                position_ids=t[None],
            )[0]
            expected[b, t] = x[b, t] + gate[k : k + t.numel(), None] * (y - x[b, t])
            k += t.numel()
    assert_close(out, expected)


@pytest.mark.parametrize("mode", ["sample", "token"])
@pytest.mark.parametrize("policy", ["schedule", "importance"])
def test_decisions_drawn_ahead_equal_layer_by_layer(mode, policy):
    """`plan_step` (what the Hugging Face patch calls before each forward, so a compiled
    decoder has no graph break) draws exactly the decisions the layers would draw one by one:
    same outputs, gradients, reports and importance EMA over steps, a fully skipped layer
    (p_max 0.9 on 3 rows) included."""
    runs = []
    for ahead in (False, True):
        skipper = LayerDynamicSkipper(
            make_layers(6), D, mode=mode, policy=policy, p_max=0.9, target_skip=0.8, seed=1
        ).train()
        x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
        outputs, rows = [], []
        for _ in range(4):
            if ahead:
                skipper.plan_step(tuple(x.shape[:-1]), x.device, x.dtype)
            out = skipper(x)
            out.square().sum().backward()
            outputs.append(out.detach())
            rows.append(list(skipper.report.rows_run))
        grads = [p.grad for p in skipper.parameters()]
        runs.append((outputs, rows, grads, skipper.change_ema.clone(), x.grad))
    (out_a, rows_a, grads_a, ema_a, xg_a), (out_b, rows_b, grads_b, ema_b, xg_b) = runs
    assert rows_a == rows_b and any(0 in r for r in rows_a), rows_a
    for a, b in [*zip(out_a, out_b), *zip(grads_a, grads_b), (ema_a, ema_b), (xg_a, xg_b)]:
        assert torch.equal(a, b)


def test_plan_step_on_an_empty_batch():
    skipper = LayerDynamicSkipper(make_layers(4), D, p_max=0.9, seed=0).train()
    x = torch.randn(0, 3, D)
    skipper.plan_step((0, 3), x.device, x.dtype)
    assert skipper(x).shape == x.shape
