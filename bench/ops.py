"""Op microbenchmarks: `python -m bench.ops [--device cuda] [--only vtc,lds,routing]`.

Each suite module (`bench/vtc.py`, `bench/lds.py`, `bench/routing.py`) exposes
`run(device, quick, copy_gbs) -> list[dict]`; this driver measures the device's copy
bandwidth once, runs the suites, prints one table and writes it to JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
from pathlib import Path

import torch

from bench.timing import copy_bandwidth_gbs

SUITES = ("vtc", "lds", "routing")
RESULTS = Path(__file__).resolve().parent / "results"


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def format_table(rows: list[dict]) -> str:
    cols = ("op", "shape", "impl", "pass", "median_ms", "gbs", "pct_copy", "peak_mb")

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    table = [cols] + [tuple(cell(r.get(c)) for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suites")
    parser.add_argument("--full", action="store_true", help="all shapes (default on GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    quick = device.type != "cuda" and not args.full
    copy_gbs = copy_bandwidth_gbs(device, nbytes=1 << (30 if device.type == "cuda" else 26))
    print(f"device {device_tag(device)}: measured copy bandwidth {copy_gbs:.1f} GB/s")
    from sts_kernels.env import collect

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"ops-{device_tag(device)}-{stamp}.json"
    env = collect()
    rows: list[dict] = []
    for name in args.only.split(","):
        suite = importlib.import_module(f"bench.{name}")
        suite_rows = suite.run(device, quick, copy_gbs)
        for row in suite_rows:
            row.setdefault("suite", name)
        rows += suite_rows
        print(format_table(suite_rows), flush=True)
        # after every suite, so a run cut short by a time limit keeps what it measured
        path.write_text(
            json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows}, indent=1, default=str)
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
