"""transformers eager speed of exports before and after a change: `lpconvert bench` of the code at REV and of this
checkout, in alternating processes.

    python scripts/results/bench_before_after.py --before REV [--models tiny,smollm2-135m] [--rounds 5] [--json out.json]

REV is checked out with `git worktree` (the commit before a change, e.g. the one before the separate-projection
layout: f60b629). Each version exports each model with its own code, so each times the layout it writes, loaded as
it loads it, with its own bench (CPU, float32, batch 1). The rounds alternate the versions and which goes first;
the table gives each median and the median of the same-round ratios after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAIRS = {"tiny": "2", "smollm2-135m": "14,17,20"}  # tiny: tests/builders' 6-layer Llama


def tiny_source(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import make_tiny_model, make_tiny_tokenizer

    make_tiny_model("llama", hidden_size=128, head_dim=32, intermediate_size=192).save_pretrained(folder)
    make_tiny_tokenizer(128).save_pretrained(folder)
    return folder


def lpconvert(code: Path, *args: str) -> str:
    """`python -m lpconvert ARGS` with the lpconvert of CODE (a checkout): its folder comes first on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(code), "LPCONVERT_PROGRESS": "off"}
    done = subprocess.run([sys.executable, "-m", "lpconvert", *args], cwd=code, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"lpconvert {' '.join(args)} failed in {code}:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with (this checkout is after)")
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lpconvert-before-after-"))
    before = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                   capture_output=True)
    versions = {"before": before, "after": ROOT}
    bench = ["--device", "cpu", "--dtype", "float32", "--batch-size", "1", "--prompt-len", str(args.prompt_len),
             "--new-tokens", str(args.new_tokens), "--warmup", "1", "--repeats", "1", "--json"]
    results = []
    try:
        for model in args.models.split(","):
            source = str(tiny_source(work / "tiny-source")) if model == "tiny" else model
            exports = {}
            for version, code in versions.items():
                exports[version] = work / f"{model}-{version}"
                lpconvert(code, "export", source, "--pairs", PAIRS[model], "-o", str(exports[version]))
            timed: dict[str, list[dict]] = {version: [] for version in versions}
            for r in range(args.rounds):
                order = list(versions) if r % 2 == 0 else list(reversed(versions))
                for version in order:
                    report = json.loads(lpconvert(versions[version], "bench", str(exports[version]), *bench))
                    timed[version].append(report["rows"][0])
                    print(f"{model} round {r + 1}/{args.rounds} {version}: "
                          f"decode {report['rows'][0]['decode_tokens_per_s']:.1f} tok/s", flush=True)
            for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                ratios = [a[key] / b[key] for a, b in zip(timed["after"], timed["before"], strict=True)]
                results.append({"model": model, "pairs": PAIRS[model], "figure": key,
                                **{version: statistics.median(r[key] for r in rows) for version, rows in timed.items()},
                                "rounds": {version: [r[key] for r in rows] for version, rows in timed.items()},
                                "after_over_before": statistics.median(ratios), "ratios": ratios})
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"\nbefore = {args.before}, after = this checkout; CPU float32, {os.cpu_count()} cores, batch 1, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} alternating rounds")
    print(f"{'model':<14} {'figure':<22} {'before':>9} {'after':>9} {'after/before':>13}  ratio range")
    for row in results:
        print(f"{row['model']:<14} {row['figure']:<22} {row['before']:>9.1f} {row['after']:>9.1f} "
              f"{row['after_over_before']:>12.3f}x  {min(row['ratios']):.3f}-{max(row['ratios']):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"before": args.before, "settings": vars(args) | {"json": None},
                                         "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
