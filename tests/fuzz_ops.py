"""Garbage inputs for every public op, run by tests/ops/test_fuzz.py in a subprocess.

Each case runs on every backend this process has (reference, cpp, and triton when
TRITON_INTERPRET=1). Before a case the script prints `CASE <name>` (flushed), so if the
process dies the parent names the case that killed it. A case may return normally or raise
ValueError / TypeError / RuntimeError with a message; anything else is recorded. The last line
is `RESULT <json>`: the number of cases run and the bad outcomes. Arguments: case names to run
(default all); `--abort` adds a case that aborts, to check the parent notices a death.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import torch

import sts_kernels as sts
from sts_kernels import RoutePlan

ALLOWED = (ValueError, TypeError, RuntimeError)
nan, inf = math.nan, math.inf


def _plan(index, shape, counts=None, offsets=None) -> RoutePlan:
    """A hand-built plan: `index` as given, counts/offsets consistent unless passed."""
    index = torch.as_tensor(index)
    b = shape[0]
    if counts is None:
        counts = torch.zeros(b, dtype=torch.int64)
        counts[0] = index.numel()
    if offsets is None:
        offsets = torch.nn.functional.pad(torch.as_tensor(counts).cumsum(0), (1, 0))
    return RoutePlan(index, torch.as_tensor(counts), offsets, shape)


def _x(*shape, dtype=torch.float32, fill=None, device="cpu"):
    if device != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    t = torch.randn(shape).to(dtype)
    return t if fill is None else t.fill_(fill)


def cases():
    """(name, thunk) pairs; each thunk calls one public op on garbage."""
    ok_plan = sts.route(torch.tensor([[True, False, True], [False, True, True]]))
    x23 = _x(2, 3, 4)
    bad_plans = {
        "index_huge": _plan([0, 2**40], (2, 3)),
        "index_negative": _plan([-5, 1], (2, 3)),
        "index_just_out": _plan([0, 6], (2, 3)),
        "index_float": _plan(torch.tensor([0.0, 1.0]), (2, 3)),
        "index_int32": _plan(torch.tensor([0, 1], dtype=torch.int32), (2, 3)),
        "index_2d": _plan(torch.tensor([[0, 1]]), (2, 3)),
        "index_unsorted_dup": _plan([4, 1, 1], (2, 3)),
        "too_many_rows": _plan(list(range(7)), (2, 3)),
        "counts_wrong_shape": _plan([0, 1], (2, 3), counts=torch.tensor([2])),
        "counts_lie": _plan([0, 1], (2, 3), counts=torch.tensor([5, -3])),
        "offsets_huge": _plan(
            [0, 1], (2, 3), counts=torch.tensor([1, 1]), offsets=torch.tensor([0, 2**40, -1])
        ),
        "shape_negative": _plan([0], (1, -3)),
        "shape_3d": _plan([0], (1, 1, 1)),
        "shape_float": _plan([0], (1.5, 2), counts=torch.tensor([1])),
        "meta_index": RoutePlan(
            torch.empty(2, dtype=torch.int64, device="meta"),
            torch.empty(2, dtype=torch.int64, device="meta"),
            torch.empty(3, dtype=torch.int64, device="meta"),
            (2, 3),
        ),
    }
    out = []
    add = lambda name, fn: out.append((name, fn))  # noqa: E731

    # route
    for name, mask in {
        "list": [[True]],
        "float": torch.ones(2, 3),
        "3d": torch.ones(1, 2, 3, dtype=torch.bool),
        "0d": torch.tensor(True),
        "empty": torch.zeros(0, dtype=torch.bool),
        "empty_tokens": torch.zeros(0, 5, dtype=torch.bool),
        "zero_tokens": torch.zeros(3, 0, dtype=torch.bool),
        "meta": torch.empty(2, 3, dtype=torch.bool, device="meta"),
        "none": None,
    }.items():
        add(f"route/{name}", lambda m=mask: sts.route(m))

    # gather_rows
    for name, plan in bad_plans.items():
        add(f"gather_rows/plan_{name}", lambda p=plan: sts.gather_rows(x23, p))
        add(f"gather_rows/padded_plan_{name}", lambda p=plan: sts.gather_rows(x23, p, True))
        add(
            f"skip_residual/plan_{name}",
            lambda p=plan: sts.skip_residual(x23, _x(2, 4), p, torch.ones(2)),
        )
    for name, args in {
        "x_list": ([[1.0]], ok_plan),
        "plan_none": (x23, None),
        "plan_tuple": (x23, (ok_plan.index, ok_plan.counts)),
        "x_wrong_rows": (_x(3, 2, 4), ok_plan),
        "x_0d": (torch.tensor(1.0), ok_plan),
        "x_no_features": (_x(2, 3), ok_plan),
        "x_int": (torch.ones(2, 3, 4, dtype=torch.int64), ok_plan),
        "x_bool": (torch.ones(2, 3, 4, dtype=torch.bool), ok_plan),
        "x_nan": (_x(2, 3, 4, fill=nan), ok_plan),
        "x_meta": (_x(2, 3, 4, device="meta"), ok_plan),
        "x_empty_feat": (_x(2, 3, 0), ok_plan),
        "padded_sample_plan": (_x(2, 4), sts.route(torch.tensor([True, False])), True),
    }.items():
        add(f"gather_rows/{name}", lambda a=args: sts.gather_rows(*a))

    # skip_residual: x [2, 3, 4], K = 4 active rows
    k4 = _x(4, 4)
    for name, args in {
        "delta_dtype": (x23, k4.double(), ok_plan),
        "delta_int": (x23, torch.ones(4, 4, dtype=torch.int64), ok_plan),
        "delta_rows": (x23, _x(5, 4), ok_plan),
        "delta_feat": (x23, _x(4, 3), ok_plan),
        "delta_padded_wrong": (x23, _x(2, 7, 4), ok_plan),
        "delta_list": (x23, [[1.0] * 4] * 4, ok_plan),
        "gate_shape": (x23, k4, ok_plan, torch.ones(3)),
        "gate_2d": (x23, k4, ok_plan, torch.ones(4, 1)),
        "gate_int": (x23, k4, ok_plan, torch.ones(4, dtype=torch.int64)),
        "gate_meta": (x23, k4, ok_plan, torch.ones(4, device="meta")),
        "gate_nan": (x23, k4, ok_plan, torch.full((4,), nan)),
        "x_inf": (_x(2, 3, 4, fill=inf), k4, ok_plan, None, True),
        "delta_nan_stats": (x23, _x(4, 4, fill=nan), ok_plan, None, True, True),
        "x_int": (torch.ones(2, 3, 4, dtype=torch.int64), k4, ok_plan),
        "x_meta": (_x(2, 3, 4, device="meta"), _x(4, 4, device="meta"), ok_plan),
        "x_zero_feat": (_x(2, 3, 0), _x(4, 0), ok_plan),
        "plan_str": (x23, k4, "plan"),
    }.items():
        add(f"skip_residual/{name}", lambda a=args: sts.skip_residual(*a))

    # token_pool: x [1, 6, 2] on a 2x3 grid
    x6 = _x(1, 6, 2)
    for name, args in {
        "grid_mismatch": (x6, (2, 2)),
        "grid_negative": (x6, (-2, -3)),
        "grid_zero": (_x(1, 0, 2), (0, 5)),
        "grid_float": (x6, (2.0, 3.0)),
        "grid_int": (x6, 6),
        "grid_huge": (x6, (2**40, 2**40)),
        "window_zero": (x6, (2, 3), 0),
        "window_negative": (x6, (2, 3), (-1, 2)),
        "window_huge": (x6, (2, 3), (2**62, 2**62)),
        "window_str": (x6, (2, 3), "2"),
        "x_2d": (_x(6, 2), (2, 3)),
        "x_int": (torch.ones(1, 6, 2, dtype=torch.int32), (2, 3)),
        "x_nan": (_x(1, 6, 2, fill=nan), (2, 3)),
        "x_meta": (_x(1, 6, 2, device="meta"), (2, 3)),
        "x_empty_batch": (_x(0, 6, 2), (2, 3)),
        "x_empty_feat": (_x(1, 6, 0), (2, 3)),
        "x_none": (None, (2, 3)),
    }.items():
        add(f"token_pool/{name}", lambda a=args: sts.token_pool(*a))

    # bipartite_merge: x [2, 7, 4]
    x7 = _x(2, 7, 4)
    for name, args in {
        "r_negative": (x7, -1),
        "r_huge": (x7, 2**62),
        "r_float": (x7, 1.5),
        "r_bool": (x7, True),
        "r_tensor": (x7, torch.tensor(2)),
        "protected_negative": (x7, 2, None, None, -1),
        "protected_huge": (x7, 2, None, None, 2**40),
        "metric_shape": (x7, 2, _x(2, 6, 4)),
        "metric_batch": (x7, 2, _x(3, 7, 4)),
        "metric_int": (x7, 2, torch.ones(2, 7, 4, dtype=torch.int64)),
        "metric_nan": (x7, 2, _x(2, 7, 4, fill=nan)),
        "metric_inf": (x7, 2, _x(2, 7, 4, fill=inf)),
        "metric_meta": (x7, 2, _x(2, 7, 4, device="meta")),
        "metric_zero_dim": (x7, 2, _x(2, 7, 0)),
        "size_zero": (x7, 2, None, torch.zeros(2, 7)),
        "size_negative": (x7, 2, None, -torch.ones(2, 7)),
        "size_nan": (x7, 2, None, torch.full((2, 7), nan)),
        "size_inf": (x7, 2, None, torch.full((2, 7), inf)),
        "size_shape": (x7, 2, None, torch.ones(2, 6)),
        "size_int": (x7, 2, None, torch.ones(2, 7, dtype=torch.int64)),
        "x_nan": (_x(2, 7, 4, fill=nan), 2),
        "x_int": (torch.ones(2, 7, 4, dtype=torch.int64), 2),
        "x_2d": (_x(7, 4), 2),
        "x_meta": (_x(2, 7, 4, device="meta"), 2),
        "x_no_tokens": (_x(2, 0, 4), 2),
        "x_no_batch": (_x(0, 7, 4), 2),
        "x_no_feat": (_x(2, 7, 0), 2),
        "x_one_token": (_x(1, 1, 4), 5, None, None, 0),
        "x_list": ([[[1.0]]], 1),
    }.items():
        add(f"bipartite_merge/{name}", lambda a=args: sts.bipartite_merge(*a))

    # unmerge: y [2, 5, 4], index [2, 7]
    y5 = _x(2, 5, 4)
    idx = torch.randint(0, 5, (2, 7))
    for name, args in {
        "index_huge": (y5, torch.full((2, 7), 2**40)),
        "index_negative": (y5, torch.full((2, 7), -1)),
        "index_just_out": (y5, torch.full((2, 7), 5)),
        "index_float": (y5, idx.float()),
        "index_int32": (y5, idx.int()),
        "index_batch": (y5, idx[:1]),
        "index_3d": (y5, idx[..., None]),
        "index_meta": (y5, idx.to("meta")),
        "index_empty": (y5, idx[:, :0]),
        "y_empty": (_x(2, 0, 4), idx),
        "y_int": (torch.ones(2, 5, 4, dtype=torch.int64), idx),
        "y_nan": (_x(2, 5, 4, fill=nan), idx),
        "y_meta": (_x(2, 5, 4, device="meta"), idx.to("meta")),
        "y_2d": (_x(5, 4), idx),
        "y_none": (None, idx),
    }.items():
        add(f"unmerge/{name}", lambda a=args: sts.unmerge(*a))
    return out


def raw_cases():
    """(name, thunk) pairs calling the registered `torch.ops.sts` ops directly (no wrapper
    validation in front of them)."""
    ops, out = torch.ops.sts, []
    x, rows = _x(6, 4), torch.tensor([0, 5, -1])
    bad_rows = {
        "huge": torch.tensor([0, 2**40]),
        "negative": torch.tensor([-7, 1]),
        "just_out": torch.tensor([6]),
        "float": torch.tensor([0.0, 1.0]),
        "3d": rows[None, None],
        "padded_out": torch.tensor([[0, 6], [-1, -5]]),  # the padded layout, ids past both ends
        "int32": rows.int(),
        "meta": rows.to("meta"),
    }
    for impl in ("", "_triton"):
        gather, scatter = getattr(ops, "gather_rows" + impl), getattr(ops, "scatter_rows" + impl)
        for name, r in bad_rows.items():
            out.append((f"gather_rows{impl}/rows_{name}", lambda g=gather, r=r: g(x, r)))
            out.append(
                (f"scatter_rows{impl}/rows_{name}", lambda s=scatter, r=r: s(x[:2], r[:2], 6))
            )
        for name, n in {"negative": -1, "huge": 2**62, "too_small": 2}.items():
            out.append(
                (f"scatter_rows{impl}/num_rows_{name}", lambda s=scatter, n=n: s(x[:3], rows, n))
            )
        out.append((f"gather_rows{impl}/x_0d", lambda g=gather: g(torch.tensor(1.0), rows)))
        add = getattr(ops, "add_rows" + impl)
        for name, r in bad_rows.items():
            out.append((f"add_rows{impl}/ids_{name}", lambda a=add, r=r: a(x.clone(), r, x[:2])))
        for name, (dst, src) in {
            "src_rows_mismatch": (x.clone(), x[:3]),
            "src_width": (x.clone(), _x(2, 5)),
            "dst_int": (torch.zeros(6, 4, dtype=torch.int64), x[:2]),
            "dst_strided": (_x(6, 8)[:, ::2], x[:2]),
            "src_dtype": (x.clone(), x[:2].double()),
        }.items():
            out.append((f"add_rows{impl}/{name}", lambda a=add, d=dst, s=src: a(d, rows[:2], s)))
    plan = sts.route(torch.tensor([True, False, True, True, False, True]))
    for name, (index, row_to_k, offsets) in {
        "index_huge": (torch.tensor([0, 2, 3, 2**40]), plan.row_to_k, plan.offsets),
        "row_to_k_huge": (plan.index, torch.full((6,), 2**40), plan.offsets),
        "row_to_k_short": (plan.index, plan.row_to_k[:2], plan.offsets),
        "offsets_huge": (plan.index, plan.row_to_k, torch.tensor([0, 2**40] + [4] * 5)),
    }.items():
        for impl in ("", "_triton"):  # the extension's CPU op and the Triton op
            out.append(
                (
                    f"skip_residual{impl}/{name}",
                    lambda a=(index, row_to_k, offsets), op="skip_residual" + impl: getattr(
                        ops, op
                    )(x, _x(4, 4), *a, None, False, False),
                )
            )
    for name, mask in {
        "float": torch.ones(4),
        "3d": torch.ones(2, 2, 2, dtype=torch.bool),
        "0d": torch.tensor(True),
        "meta": torch.ones(3, dtype=torch.bool, device="meta"),
    }.items():
        out.append((f"route_triton/{name}", lambda m=mask: ops.route_triton(m)))
    y, idx = _x(1, 3, 4), torch.tensor([[0, 1, 2, 9, -4]])
    out.append(("unmerge/index_out", lambda: ops.unmerge_triton(y, idx)))
    out.append(("merge_wavg/index_out", lambda: ops.merge_wavg_triton(_x(1, 5, 4), None, idx, 3)))
    out.append(("token_pool/grid_too_big", lambda: ops.token_pool_triton(_x(1, 6, 2), 4, 4, 2, 2)))
    out.append(("token_pool/window_zero", lambda: ops.token_pool_triton(_x(1, 6, 2), 2, 3, 0, 2)))
    out.append(
        ("token_pool/window_negative", lambda: ops.token_pool_triton(_x(1, 6, 2), 2, 3, -2, 2))
    )
    return out


def run(names=None, abort=False) -> dict:
    bad, count = [], 0
    backends = sts.available_backends("cpu")
    runs = [(b, cases()) for b in backends] + [("raw", raw_cases())]
    for backend, named in runs:
        for name, fn in named + ([("selftest/abort", os.abort)] if abort else []):
            if names and name not in names:
                continue
            label = f"{backend}:{name}"
            print(f"CASE {label}", flush=True)
            count += 1
            try:
                with contextlib.nullcontext() if backend == "raw" else sts.use_backend(backend):
                    result = fn()
                # a lazy result must not hide a failure: touch every tensor it returned
                for t in result if isinstance(result, tuple) else (result,):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
                        t.sum().item()
            except ALLOWED as e:
                if not str(e).strip():
                    bad.append(f"{label}: {type(e).__name__} without a message")
            except Exception as e:  # noqa: BLE001 - the point is to record the wrong type
                bad.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
    return {"backends": backends, "cases": count, "bad": bad}


if __name__ == "__main__":
    args = set(sys.argv[1:])
    result = run(args - {"--abort"} or None, abort="--abort" in args)
    print("RESULT " + json.dumps(result), flush=True)
