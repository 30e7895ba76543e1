"""The op benchmarks run end to end on CPU (quick shapes): every suite writes its rows, and the
skipper rows carry the bytes-moved / ideal ratio. Timings are not checked (benchmarks, not
tests); what breaks here is the benchmark code itself (e.g. a sparse gradient its byte counter
could not size)."""

import json

from bench import ops


def test_bench_ops_writes_every_suite(tmp_path):
    ops.main(["--device", "cpu", "--no-compile", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("ops-*.json")
    result = json.loads(path.read_text())
    measured = {row["op"] for row in result["rows"]}
    assert {"token_pool", "bipartite_merge", "skip_residual", "skip_layer", "route"} <= measured
    assert result["env"] and result["copy_gbs"] > 0
    layer_rows = [row for row in result["rows"] if row["op"] == "skip_layer"]
    assert layer_rows and all(row["bytes_ratio_fwd+bwd"] >= 1.0 for row in layer_rows)
