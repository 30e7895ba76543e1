"""VisualTokenCompressor: pool/merge modes, sizes across calls, eval identity, checks."""

import pytest
import torch
from kernel_count import count_kernels

import sts_kernels
from sts_kernels import reference
from sts_kernels.nn.compressor import CompressedTokens, VisualTokenCompressor


def test_pool_mode_matches_token_pool():
    x = torch.randn(2, 35, 8)
    vtc = VisualTokenCompressor("pool", window=(2, 2))
    out = vtc(x, grid=(5, 7))
    assert isinstance(out, CompressedTokens)
    torch.testing.assert_close(out.x, reference.token_pool(x, (5, 7), (2, 2)))
    assert out.grid == (3, 4)
    # window counts of a 5x7 grid in 2x2 windows: rows 2,2,1 x cols 2,2,2,1
    counts = torch.tensor([2.0, 2.0, 1.0])[:, None] * torch.tensor([2.0, 2.0, 2.0, 1.0])
    assert torch.equal(out.size, counts.reshape(1, 12).expand(2, 12))
    assert out.kept.tolist() == [12, 12] and out.kept.dtype == torch.int64
    assert vtc.output_tokens(35, (5, 7)) == 12


def test_pool_sizes_add_up_across_calls():
    x = torch.randn(1, 35, 4)
    vtc = VisualTokenCompressor("pool", window=2)
    first = vtc(x, grid=(5, 7))
    second = vtc(first.x, grid=first.grid, size=first.size)
    assert second.grid == (2, 2)
    assert second.size.tolist() == [[16.0, 12.0, 4.0, 3.0]]
    assert second.size.sum().item() == 35


@pytest.mark.parametrize("protected", [0, 1])
def test_merge_mode_matches_bipartite_merge(protected):
    x = torch.randn(2, 33, 8)
    vtc = VisualTokenCompressor("merge", ratio=0.75, protected=protected)
    out = vtc(x)
    r = round(33 * 0.25)
    ref = reference.bipartite_merge(x, r, protected=protected)
    torch.testing.assert_close(out.x, ref.x)
    torch.testing.assert_close(out.size, ref.size)
    assert out.grid is None
    assert out.kept.tolist() == [33 - r] * 2
    assert vtc.output_tokens(33) == 33 - r


def test_merge_r_argument_overrides_and_caps():
    x = torch.randn(2, 20, 4)
    metric = torch.randn(2, 20, 6)
    vtc = VisualTokenCompressor("merge", r=3, protected=1)
    assert vtc(x).x.shape[1] == 17
    out = vtc(x, metric=metric, r=5)
    ref = reference.bipartite_merge(x, 5, metric=metric, protected=1)
    torch.testing.assert_close(out.x, ref.x)
    assert vtc(x, r=100).x.shape[1] == 20 - 19 // 2  # capped at half the unprotected tokens
    # ratio 0.1 asks for 18 tokens but the cap allows 9
    assert VisualTokenCompressor("merge", ratio=0.1, protected=1).output_tokens(20) == 11


def test_merge_sizes_carry_across_calls():
    x = torch.randn(2, 40, 4)
    vtc = VisualTokenCompressor("merge", r=8)
    first = vtc(x)
    second = vtc(first.x, size=first.size)
    ref1 = reference.bipartite_merge(x, 8)
    ref2 = reference.bipartite_merge(ref1.x, 8, size=ref1.size)
    torch.testing.assert_close(second.x, ref2.x)
    torch.testing.assert_close(second.size, ref2.size)
    torch.testing.assert_close(second.size.sum(1), torch.full((2,), 40.0))


def test_eval_is_identity_unless_enabled():
    x = torch.randn(2, 16, 4)
    for mode, compressed in (("pool", 4), ("merge", 8)):
        vtc = VisualTokenCompressor(mode).eval()
        out = vtc(x, grid=(4, 4))
        assert out.x is x and out.kept.tolist() == [16, 16]
        assert torch.equal(out.size, torch.ones(2, 16))
        assert vtc.output_tokens(16, (4, 4)) == 16
        enabled = VisualTokenCompressor(mode, enabled_in_eval=True).eval()
        assert enabled(x, grid=(4, 4)).x.shape[1] == compressed
        assert enabled.output_tokens(16, (4, 4)) == compressed


def test_gradient_flows_to_x():
    for mode in ("pool", "merge"):
        x = torch.randn(1, 16, 4, requires_grad=True)
        VisualTokenCompressor(mode)(x, grid=(4, 4)).x.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_per_image_calls_for_different_grids():
    vtc = VisualTokenCompressor("pool", window=(2, 2))
    grids = [(4, 6), (3, 5)]
    images = [torch.randn(1, h * w, 8) for h, w in grids]
    outs = [vtc(img, grid=g) for img, g in zip(images, grids)]
    assert [o.x.shape[1] for o in outs] == [vtc.output_tokens(h * w, (h, w)) for h, w in grids]
    assert [o.x.shape[1] for o in outs] == [6, 6]


@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_compress_many_equals_one_call_per_item(mode):
    vtc = VisualTokenCompressor(mode, ratio=0.6)
    grids = [(4, 6), (3, 5), (4, 6), (3, 5), (2, 2)]
    frames = [1, 3, 2, 1, 1]
    xs = [torch.randn(f, h * w, 8) for f, (h, w) in zip(frames, grids)]
    outs = vtc.compress_many(xs, grids)
    for x, grid, out in zip(xs, grids, outs):
        expected = vtc(x, grid=grid)
        assert torch.equal(out.x, expected.x) and torch.equal(out.size, expected.size)
        assert out.grid == expected.grid and out.kept.tolist() == expected.kept.tolist()


def test_compress_many_metrics_choose_the_pairs():
    """Other features of the same tokens (any D) merged with `metrics=` the main tokens: every
    item's frames merge exactly as the main merge groups them (the main index: group means
    of unit sizes, computed here), in the same slots, with the same sizes and anchors."""
    vtc = VisualTokenCompressor("merge", ratio=0.5)
    grids = [(4, 6), (3, 5), (4, 6)]
    frames = [1, 3, 2]
    xs = [torch.randn(f, h * w, 8) for f, (h, w) in zip(frames, grids)]
    levels = [torch.randn(f, h * w, 5) for f, (h, w) in zip(frames, grids)]
    main = vtc.compress_many(xs, grids)
    merged = vtc.compress_many(levels, grids, metrics=xs)
    own = vtc.compress_many(levels, grids)
    assert any(not torch.equal(o.anchors, m.anchors) for o, m in zip(own, main))  # can tell
    for x, level, m, out in zip(xs, levels, main, merged):
        index = reference.bipartite_merge(x, round(x.shape[1] * 0.5)).index
        n_out = m.x.shape[1]
        means = torch.stack(
            [torch.stack([f[i == j].mean(0) for j in range(n_out)]) for f, i in zip(level, index)]
        )
        torch.testing.assert_close(out.x, means)
        assert torch.equal(out.size, m.size) and torch.equal(out.anchors, m.anchors)


def test_compress_many_time_window_averages_frame_windows():
    vtc = VisualTokenCompressor("pool", window=(2, 2), time_window=2)
    video, image = torch.randn(3, 16, 4), torch.randn(1, 16, 4)  # 3 frames: windows {0,1}, {2}
    out_video, out_image = vtc.compress_many([video, image], [(4, 4), (4, 4)])
    frames = reference.token_pool(video, (4, 4), (2, 2))  # [3, 4, 4]
    expected = torch.stack([frames[:2].mean(0), frames[2]])
    torch.testing.assert_close(out_video.x, expected)
    assert out_video.size.tolist() == [[8.0] * 4, [4.0] * 4] and out_video.grid == (2, 2)
    torch.testing.assert_close(out_image.x, reference.token_pool(image, (4, 4), (2, 2)))
    assert (
        VisualTokenCompressor("pool", time_window=2)
        .eval()
        .compress_many([video], [(4, 4)])[0]
        .x.equal(video)
    )


@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_compress_many_kernel_count_does_not_grow_with_images(mode):
    """Images sharing a grid go through one call: 4 or 12 images of two grids cost the same."""
    vtc = VisualTokenCompressor(mode)
    counts = []
    for n in (2, 6):
        grids = [(4, 6), (3, 5)] * n
        xs = [torch.randn(1, h * w, 8) for h, w in grids]
        with count_kernels() as c:
            vtc.compress_many(xs, grids)
        counts.append((c.kernels, c.syncs, str(c)))
    assert counts[0][:2] == counts[1][:2], counts


@pytest.mark.parametrize(
    ("kwargs", "call", "words"),
    [
        (dict(time_window=0), None, "time_window"),
        (dict(time_window=2, mode="merge"), None, "time_window"),
        ({}, ([torch.randn(1, 4, 2)], []), "same length"),
        ({}, ([torch.randn(4, 2)], [(2, 2)]), "xs"),
        ({}, ([torch.randn(1, 4, 2)], [(3, 3)]), "grid"),
        ({}, ([torch.randn(1, 4, 2)], [(2, 2)], [torch.randn(1, 4, 2)]), "metrics"),
        (dict(mode="merge"), ([torch.randn(1, 4, 2)], [None], []), "metrics"),
        (dict(mode="merge"), ([torch.randn(2, 4, 2)], [None], [torch.randn(1, 4, 3)]), "metrics"),
        (dict(mode="merge"), ([torch.randn(1, 4, 2)], [None], [torch.randn(4, 3)]), "metrics"),
        (  # one C for all items (same N: one call)
            dict(mode="merge"),
            ([torch.randn(1, 4, 2)] * 2, [None] * 2, [torch.randn(1, 4, 3), torch.randn(1, 4, 5)]),
            r"metrics\[1\]",
        ),
    ],
)
def test_compress_many_bad_input(kwargs, call, words):
    with pytest.raises(ValueError, match=words):
        VisualTokenCompressor(**kwargs).compress_many(*call)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["pool", "merge"])
def test_triton_backend(mode, triton_device):
    x = torch.randn(2, 35, 16, device=triton_device)
    vtc = VisualTokenCompressor(mode, protected=1 if mode == "merge" else 0)
    expected = vtc(x, grid=(5, 7))
    with sts_kernels.use_backend("triton"):
        out = vtc(x, grid=(5, 7))
    torch.testing.assert_close(out.x, expected.x)
    assert torch.equal(out.size, expected.size)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        (dict(window=0), ValueError, "window"),
        (dict(window=(2, -2)), ValueError, "window"),
        (dict(mode="avg"), ValueError, "mode"),
        (dict(ratio=0.0), ValueError, "ratio"),
        (dict(ratio=1.5), ValueError, "ratio"),
        (dict(mode="merge", r=-1), ValueError, "r"),
        (dict(mode="merge", r=1.5), TypeError, "r"),
        (dict(mode="merge", ratio=None, r=None), ValueError, "ratio"),
        (dict(protected=-1), ValueError, "protected"),
    ],
)
def test_bad_construction(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        VisualTokenCompressor(**kwargs)


@pytest.mark.parametrize(
    ("mode", "kwargs", "exc", "words"),
    [
        ("pool", dict(grid=None), ValueError, "grid"),
        ("pool", dict(grid=(3, 3)), ValueError, "grid"),
        ("pool", dict(r=2), ValueError, "r"),
        ("pool", dict(metric=torch.randn(2, 16, 4)), ValueError, "metric"),
        ("merge", dict(r=-2), ValueError, "r"),
        ("merge", dict(size=torch.ones(2, 15)), ValueError, "size"),
        ("merge", dict(size=torch.ones(2, 16, dtype=torch.int64)), TypeError, "size"),
        ("merge", dict(metric=torch.randn(2, 15, 4)), ValueError, "metric"),
        ("merge", dict(x=torch.zeros(2, 16, 4, dtype=torch.int32)), TypeError, "x"),
    ],
)
def test_bad_forward_input(mode, kwargs, exc, words):
    args = dict(x=torch.randn(2, 16, 4), grid=(4, 4)) | kwargs
    with pytest.raises(exc, match=words):
        VisualTokenCompressor(mode)(**args)


def test_protected_not_less_than_n_is_rejected():
    with pytest.raises(ValueError, match="protected"):
        VisualTokenCompressor("merge", protected=16)(torch.randn(1, 16, 4))
