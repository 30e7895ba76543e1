"""Fuzz: every public op on garbage inputs (tests/fuzz_ops.py) in a subprocess. The process
must never die (segfault, abort, hang) and every failure must be a ValueError, TypeError or
RuntimeError with a message."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sts_kernels
from sts_kernels import RoutePlan

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "fuzz_ops.py"


def _fuzz(*args: str, debug: bool) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = dict(os.environ, STS_DEBUG="1" if debug else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
    return proc, result


def _death(proc: subprocess.CompletedProcess) -> str:
    """Why the fuzz process died and in which case (its last `CASE` line)."""
    last = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("CASE ")), "")
    how = (
        f"signal {signal.Signals(-proc.returncode).name}"
        if proc.returncode < 0
        else f"exit code {proc.returncode}"
    )
    return f"fuzz process died ({how}) in {last[5:] or 'setup'}:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("debug", [False, True], ids=["default", "STS_DEBUG"])
def test_fuzz_never_kills_the_process(debug):
    proc, result = _fuzz(debug=debug)
    assert proc.returncode == 0 and result is not None, _death(proc)
    assert result["cases"] > 100 * len(result["backends"]) // 2
    bad = result["bad"]
    assert not bad, "ops failed with the wrong exception:\n" + "\n".join(bad)


def test_fuzz_reports_the_killing_case():
    """The harness notices a death and names the case (so the test above can fail)."""
    proc, result = _fuzz("route/none", "selftest/abort", "--abort", debug=False)
    assert result is None and proc.returncode == -signal.SIGABRT
    assert "selftest/abort" in _death(proc)


def test_reference_bad_plan_raises_value_error():
    plan = RoutePlan(torch.tensor([0, 6]), torch.tensor([2, 0]), torch.tensor([0, 2, 2]), (2, 3))
    x = torch.randn(2, 3, 4)
    with sts_kernels.use_backend("reference"):
        with pytest.raises(ValueError, match="plan.index"):
            sts_kernels.gather_rows(x, plan)
        with pytest.raises(ValueError, match="plan.index"):
            sts_kernels.skip_residual(x, torch.randn(2, 4), plan)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_token_pool_window_larger_than_grid(backend):
    """A window past the grid pools what is inside it; a huge one (found by the fuzz test:
    the Triton kernel unrolled 2**124 steps and hung) too."""
    x = torch.randn(2, 6, 3)
    with sts_kernels.use_backend(backend):
        for window in [(2, 4), (5, 3), (2**62, 2**62)]:
            out = sts_kernels.token_pool(x, (2, 3), window)
            torch.testing.assert_close(out, x.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("geometry", [(4, 4, 2, 2), (2, 3, 0, 2), (2, 3, 2, -1), (-2, -3, 1, 1)])
def test_raw_token_pool_checks_geometry(geometry):
    """Found by the fuzz test: the raw op read past x for a grid larger than N and divided by
    zero for a zero window."""
    x = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match="sts::token_pool_triton: grid"):
        torch.ops.sts.token_pool_triton(x, *geometry)
    with pytest.raises(ValueError, match="sts::token_pool_triton: grid"):
        torch.ops.sts.token_pool_backward_triton(x[:, :1], *geometry)
