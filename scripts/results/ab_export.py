"""A/B of export variants on a bench checkpoint: wall time and the child's CPU (getrusage), interleaved.

Wall time on this kind of VM swings with the disk; the CPU the export spends (user + system) is the
steadier figure for a change to its own work. Each run starts as bench_export's do (`same_start`).
A variant is NAME=SETTINGS, SETTINGS a comma list of KEY:VALUE environment entries; LP_CWD runs the
lpconvert found in that folder (e.g. a `git worktree` of the commit before):

    python scripts/results/bench_export.py --shape llama2-7b --workdir /tmp/lpb7 --repeats 1   # builds the source
    git worktree add /tmp/before HEAD~1
    python scripts/results/ab_export.py /tmp/lpb7/source --runs 3 before=LP_CWD:/tmp/before after=
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import same_start  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, settings = spec.partition("=")
    env = dict(os.environ)
    for entry in filter(None, settings.split(",")):
        key, value = entry.split(":", 1)
        env[key] = value
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("variants", nargs="+", help="NAME=KEY:VALUE,... (empty settings: as installed)")
    parser.add_argument("--pairs", default=None, help="pair starts (default: 8 pairs in the middle)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    layers = json.loads((args.source / "config.json").read_text())["num_hidden_layers"]
    pairs = args.pairs or ",".join(str((layers - 16) // 2 + 2 * k) for k in range(8))
    out = args.source.parent / "ab-out"
    variants = dict(parse_variant(v) for v in args.variants)
    cmd = [sys.executable, "-m", "lpconvert", "export", str(args.source), "--pairs", pairs, "-o", str(out)]
    for _ in range(args.runs):
        for name, env in variants.items():
            same_start(args.source, out)
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, cwd=env.get("LP_CWD", str(ROOT)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            print(f"{name:10s} wall {wall:6.2f} s  user {usage.ru_utime:5.2f} s  sys {usage.ru_stime:5.2f} s  "
                  f"cpu {usage.ru_utime + usage.ru_stime:5.2f} s  page faults {usage.ru_minflt}  "
                  f"peak RSS {usage.ru_maxrss / 1e6:.2f} GB  exit {status}", flush=True)
    same_start(args.source, out)


if __name__ == "__main__":
    main()
