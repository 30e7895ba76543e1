"""Bad input to every public op raises ValueError/TypeError naming the argument, before any
kernel runs, and leaves the inputs untouched."""

from __future__ import annotations

import pytest
import torch

import sts_kernels as sts

META = torch.device("meta")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _plan(b=2, t=3):
    """A [B, T] token plan with rows (0, 0), (0, 2), (1, 1): K=3, Kmax=2."""
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 0] = mask[0, 2] = mask[1, 1] = True
    return sts.route(mask)


def _sample_plan():
    return sts.route(torch.tensor([True, False, True]))


def _merged():
    return sts.bipartite_merge(_x(2, 6, 4), 2)


# (call, exception, regex naming the argument)
# fmt: off
CASES = {
    # token_pool
    "pool_x_not_tensor": (lambda: sts.token_pool([[1.0]], (1, 1)), TypeError, r"^x must be a torch\.Tensor"),
    "pool_x_rank": (lambda: sts.token_pool(_x(4, 3), (2, 2)), ValueError, r"^x must have 3 dims"),
    "pool_x_int": (lambda: sts.token_pool(torch.ones(1, 4, 3, dtype=torch.int64), (2, 2)), TypeError, r"^x must have a floating dtype"),
    "pool_grid_vs_n": (lambda: sts.token_pool(_x(1, 8, 3), (3, 3)), ValueError, r"^grid \(3, 3\) holds 9 tokens but x has N=8"),
    "pool_grid_zero": (lambda: sts.token_pool(_x(1, 0, 3), (0, 4)), ValueError, r"^grid must be positive"),
    "pool_grid_not_pair": (lambda: sts.token_pool(_x(1, 4, 3), (2, 2, 1)), TypeError, r"^grid must be an int or a pair"),
    "pool_window_zero": (lambda: sts.token_pool(_x(1, 4, 3), (2, 2), (0, 2)), ValueError, r"^window must be positive"),
    "pool_window_negative": (lambda: sts.token_pool(_x(1, 4, 3), (2, 2), -1), ValueError, r"^window must be positive"),
    "pool_window_float": (lambda: sts.token_pool(_x(1, 4, 3), (2, 2), (2.0, 2)), TypeError, r"^window must be an int or a pair"),
    "pool_window_bool": (lambda: sts.token_pool(_x(1, 4, 3), (2, 2), True), TypeError, r"^window must be an int or a pair"),
    # bipartite_merge
    "merge_x_rank": (lambda: sts.bipartite_merge(_x(6, 4), 1), ValueError, r"^x must have 3 dims"),
    "merge_x_int": (lambda: sts.bipartite_merge(torch.ones(1, 6, 4, dtype=torch.int32), 1), TypeError, r"^x must have a floating dtype"),
    "merge_r_negative": (lambda: sts.bipartite_merge(_x(1, 6, 4), -1), ValueError, r"^r must be >= 0"),
    "merge_r_float": (lambda: sts.bipartite_merge(_x(1, 6, 4), 1.0), TypeError, r"^r must be an int"),
    "merge_protected_eq_n": (lambda: sts.bipartite_merge(_x(1, 6, 4), 1, protected=6), ValueError, r"^protected must be in \[0, N=6\)"),
    "merge_protected_gt_n": (lambda: sts.bipartite_merge(_x(1, 6, 4), 1, protected=9), ValueError, r"^protected must be in"),
    "merge_protected_negative": (lambda: sts.bipartite_merge(_x(1, 6, 4), 1, protected=-1), ValueError, r"^protected must be in"),
    "merge_protected_none": (lambda: sts.bipartite_merge(_x(1, 6, 4), 1, protected=None), TypeError, r"^protected must be an int"),
    "merge_metric_other_b": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, metric=_x(1, 6, 5)), ValueError, r"^metric must have shape \[B=2, N=6, C\]"),
    "merge_metric_other_n": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, metric=_x(2, 7, 4)), ValueError, r"^metric must have shape"),
    "merge_metric_rank": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, metric=_x(2, 6)), ValueError, r"^metric must have 3 dims"),
    "merge_metric_int": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, metric=torch.ones(2, 6, 4, dtype=torch.int64)), TypeError, r"^metric must have a floating dtype"),
    "merge_metric_device": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, metric=torch.empty(2, 6, 4, device=META)), ValueError, r"^metric must be on the same device as x"),
    "merge_size_shape": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, size=torch.ones(2, 5)), ValueError, r"^size must have shape \(2, 6\)"),
    "merge_size_rank": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, size=torch.ones(2, 6, 1)), ValueError, r"^size must have 2 dims"),
    "merge_size_int": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, size=torch.ones(2, 6, dtype=torch.int64)), TypeError, r"^size must have a floating dtype"),
    "merge_size_device": (lambda: sts.bipartite_merge(_x(2, 6, 4), 1, size=torch.empty(2, 6, device=META)), ValueError, r"^size must be on the same device as x"),
    # unmerge
    "unmerge_y_rank": (lambda: sts.unmerge(_x(4, 3), torch.zeros(1, 6, dtype=torch.int64)), ValueError, r"^y must have 3 dims"),
    "unmerge_y_int": (lambda: sts.unmerge(torch.ones(2, 4, 3, dtype=torch.int64), _merged().index), TypeError, r"^y must have a floating dtype"),
    "unmerge_index_rank": (lambda: sts.unmerge(_merged().x, _merged().index[0]), ValueError, r"^index must have 2 dims"),
    "unmerge_index_dtype": (lambda: sts.unmerge(_merged().x, _merged().index.int()), TypeError, r"^index must be int64"),
    "unmerge_index_other_b": (lambda: sts.unmerge(_merged().x, _merged().index[:1]), ValueError, r"^index must have shape \[B=2, N\]"),
    "unmerge_index_device": (lambda: sts.unmerge(_merged().x, torch.empty(2, 6, dtype=torch.int64, device=META)), ValueError, r"^index must be on the same device as y"),
    # route
    "route_not_tensor": (lambda: sts.route([True, False]), TypeError, r"^mask must be a torch\.Tensor"),
    "route_mask_float": (lambda: sts.route(torch.ones(2, 3)), TypeError, r"^mask must be a bool tensor"),
    "route_mask_int": (lambda: sts.route(torch.ones(2, 3, dtype=torch.int64)), TypeError, r"^mask must be a bool tensor"),
    "route_mask_rank3": (lambda: sts.route(torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, r"^mask must be \[B\] or \[B, T\]"),
    "route_mask_rank0": (lambda: sts.route(torch.tensor(True)), ValueError, r"^mask must be \[B\] or \[B, T\]"),
    # gather_rows
    "gather_x_not_tensor": (lambda: sts.gather_rows(None, _plan()), TypeError, r"^x must be a torch\.Tensor"),
    "gather_plan_type": (lambda: sts.gather_rows(_x(2, 3, 4), torch.tensor([0, 2])), TypeError, r"^plan must be a RoutePlan"),
    "gather_plan_shape": (lambda: sts.gather_rows(_x(2, 4, 4), _plan()), ValueError, r"^x must start with the mask's shape \(plan.shape=\(2, 3\)\)"),
    "gather_plan_rank": (lambda: sts.gather_rows(_x(3), _plan()), ValueError, r"^x must start with the mask's shape"),
    "gather_plan_device": (lambda: sts.gather_rows(torch.empty(2, 3, 4, device=META), _plan()), ValueError, r"^plan is on cpu but x is on meta"),
    "gather_padded_samples": (lambda: sts.gather_rows(_x(3, 5, 4), _sample_plan(), padded=True), ValueError, r"^padded=True needs a \[B, T\] token mask"),
    # skip_residual
    "skip_x_int": (lambda: sts.skip_residual(torch.ones(2, 3, 4, dtype=torch.int64), _x(3, 4), _plan()), TypeError, r"^x must have a floating dtype"),
    "skip_delta_int": (lambda: sts.skip_residual(_x(2, 3, 4), torch.ones(3, 4, dtype=torch.int64), _plan()), TypeError, r"^delta must have a floating dtype"),
    "skip_delta_not_tensor": (lambda: sts.skip_residual(_x(2, 3, 4), 1.0, _plan()), TypeError, r"^delta must be a torch\.Tensor"),
    "skip_delta_rows": (lambda: sts.skip_residual(_x(2, 3, 4), _x(4, 4), _plan()), ValueError, r"^delta must have shape \(3, 4\)"),
    "skip_delta_features": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 5), _plan()), ValueError, r"^delta must have shape \(3, 4\)"),
    "skip_delta_padded_kmax": (lambda: sts.skip_residual(_x(2, 3, 4), _x(2, 3, 4), _plan()), ValueError, r"^delta must have shape \(2, 2, 4\)"),
    "skip_delta_dtype": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4, dtype=torch.float16), _plan()), TypeError, r"^delta must have x's dtype"),
    "skip_delta_device": (lambda: sts.skip_residual(_x(2, 3, 4), torch.empty(3, 4, device=META), _plan()), ValueError, r"^delta must be on the same device as x"),
    "skip_plan_type": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4), None), TypeError, r"^plan must be a RoutePlan"),
    "skip_plan_shape": (lambda: sts.skip_residual(_x(3, 3, 4), _x(3, 4), _plan()), ValueError, r"^x must start with the mask's shape"),
    "skip_plan_samples_vs_tokens": (lambda: sts.skip_residual(_x(2, 4), _x(2, 4), _sample_plan()), ValueError, r"^x must start with the mask's shape \(plan.shape=\(3,\)\)"),
    "skip_gate_length": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4), _plan(), gate=torch.ones(2)), ValueError, r"^gate must have shape \(3,\)"),
    "skip_gate_rank": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4), _plan(), gate=torch.ones(3, 1)), ValueError, r"^gate must have 1 dims"),
    "skip_gate_int": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4), _plan(), gate=torch.ones(3, dtype=torch.int64) ),
        TypeError,
        r"^gate must have a floating dtype",
    ),
    "skip_gate_device": (lambda: sts.skip_residual(_x(2, 3, 4), _x(3, 4), _plan(), gate=torch.empty(3, device=META)), ValueError, r"^gate must be on the same device as x"),
}
# fmt: on


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_argument(case):
    call, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        call()


def test_checks_run_before_kernels_and_leave_inputs_alone():
    """A failing call must not have touched its (valid) tensors."""
    x, delta, plan = _x(2, 3, 4), _x(3, 4), _plan()
    x0, d0 = x.clone(), delta.clone()
    with pytest.raises(ValueError, match="^gate"):
        sts.skip_residual(x, delta, plan, gate=torch.ones(5))
    assert torch.equal(x, x0) and torch.equal(delta, d0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: sts.token_pool(_x(2, 6, 3), (2, 3), 2),
        lambda: sts.token_pool(_x(2, 6, 3), [3, 2], [5, 5]),
        lambda: sts.bipartite_merge(_x(2, 6, 3), 0, protected=5),
        lambda: sts.bipartite_merge(_x(2, 6, 3, dtype=torch.bfloat16), 10, metric=_x(2, 6, 1)),
        lambda: sts.bipartite_merge(_x(2, 6, 3), 2, size=torch.ones(2, 6, dtype=torch.float16)),
        lambda: sts.route(torch.zeros(0, dtype=torch.bool)),
        lambda: sts.gather_rows(_x(3, 5, 4), _sample_plan()),
        lambda: sts.skip_residual(_x(2, 3, 4), _x(2, 2, 4), _plan()),  # padded delta
        lambda: sts.skip_residual(_x(2, 3), _x(3), _plan(), gate=_x(3, dtype=torch.float16)),
    ],
)
def test_valid_edge_input_is_accepted(call):
    """The checks reject bad input only: these boundary cases are legal."""
    call()
