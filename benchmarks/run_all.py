"""Run every benchmark with its quick defaults (``make bench``), one after another, and print the headlines.

    python benchmarks/run_all.py                       # all of them (2 quiet cores: ~30 min with bf16 before issue 15; fp32: benchmarks/README.md)
    python benchmarks/run_all.py --only train_throughput data_throughput
    python benchmarks/run_all.py --skip time_to_quality --results /tmp/bench

The scripts run sequentially (never in parallel: they measure the same cores). Each writes its JSON into
``--results`` (default benchmarks/results/). Extra arguments after ``--`` go to every script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SCRIPTS = [
    "train_throughput",
    "data_throughput",
    "time_to_quality",
    "profile_ours",
    "memory",
    "export_latency",
    "index_latency",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SCRIPTS, help="run just these")
    p.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[], help="leave these out")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="folder for the JSON files")
    return p.parse_args(argv)


def headline(name: str, path: Path) -> str:
    """One line per benchmark from its JSON."""
    if not path.exists():
        return f"{name}: no results"
    data: dict[str, Any] = json.loads(path.read_text())
    if name == "train_throughput":
        s = data["summary"]
        ours, oc = s.get("ours", {}), s.get("open_clip", {})
        ratio = s.get("ratio", {}).get("median_of_pairs")
        return (
            f"train_throughput: ours {ours.get('samples_per_s', {}).get('median', float('nan')):.1f} samples/s, "
            f"open_clip {oc.get('samples_per_s', {}).get('median', float('nan')):.1f}; ours/open_clip "
            f"{ratio if ratio is not None else float('nan'):.2f}"
        )
    if name == "data_throughput":
        parts = []
        for size, res in data["results"].items():
            med = res["median"]
            if "ours" in med:
                top = max(med["ours"], key=lambda w: med["ours"][w]["median"] or 0)
                parts.append(f"{size} px ours {med['ours'][top]['median']:.0f} img/s ({top} workers)")
        return "data_throughput: " + "; ".join(parts)
    if name == "time_to_quality":
        s = data["summary"]
        ratio = s.get("ratio_ours_over_best_open_clip")
        return (
            f"time_to_quality: ours / best open_clip = {ratio:.2f}"
            if ratio
            else "time_to_quality: no ratio (a target not reached)"
        )
    return f"{name}: see {path}"


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args_with_extra(argv)
    names = [n for n in (args.only or SCRIPTS) if n not in args.skip]
    print(common.machine_line(), flush=True)
    failures, lines = [], []
    for name in names:
        out = args.results / f"{name}.json"
        cmd = [sys.executable, str(common.BENCH_DIR / f"{name}.py"), "--out", str(out), *extra]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, env=common.child_env())
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f}s", flush=True)
        if code:
            failures.append(name)
        lines.append(headline(name, out))
    print("\n" + common.machine_line() + "\n" + "\n".join(lines))
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def parse_args_with_extra(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    return parse_args(argv), extra


if __name__ == "__main__":
    sys.exit(main())
