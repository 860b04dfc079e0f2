"""transformers speed of exports before and after a change, and of the source model in plain transformers:
`lpconvert bench` of the code at REV and of this checkout, in alternating processes, eager and compiled.

    python scripts/results/bench_before_after.py --before REV [--models tiny,smollm2-135m,gemma3-270m] \
        [--modes eager,compiled] [--rounds 5] [--json out.json]

REV is checked out with `git worktree` (the commit before a change, e.g. the one before the separate-projection
layout: f60b629). Each version exports each model with its own code, so each times the layout it writes, loaded as
it loads it, with its own bench (CPU, float32, batch 1). "source" is the source model itself in transformers (its
own class), timed by this checkout's bench. The rounds alternate the versions and which goes first; the table
gives each median and the median of the same-round ratios after / before and after / source.
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
# tiny: tests/builders' 6-layer Llama; Gemma-3-270M: its default plan at 15 of 18 blocks (docs/tasks.md)
PAIRS = {"tiny": "2", "smollm2-135m": "14,17,20", "gemma3-270m": "8,13,15"}


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
    parser.add_argument("--modes", default="eager", help="eager, compiled (lpconvert bench --compile), or both")
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
            timed_models = {**exports, "source": source}
            codes = {**versions, "source": ROOT}
            for mode in args.modes.split(","):
                flags = ["--compile"] if mode == "compiled" else []
                timed: dict[str, list[dict]] = {version: [] for version in timed_models}
                for r in range(args.rounds):
                    order = list(timed_models) if r % 2 == 0 else list(reversed(timed_models))
                    for version in order:
                        report = json.loads(lpconvert(codes[version], "bench", str(timed_models[version]), *bench,
                                                      *flags))
                        timed[version].append(report["rows"][0])
                        print(f"{model} {mode} round {r + 1}/{args.rounds} {version}: "
                              f"decode {report['rows'][0]['decode_tokens_per_s']:.1f} tok/s", flush=True)
                for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
                    def ratios(over: str, key=key, timed=timed) -> list[float]:
                        return [a[key] / b[key] for a, b in zip(timed["after"], timed[over], strict=True)]
                    results.append({
                        "model": model, "pairs": PAIRS[model], "mode": mode, "figure": key,
                        **{version: statistics.median(r[key] for r in rows) for version, rows in timed.items()},
                        "rounds": {version: [r[key] for r in rows] for version, rows in timed.items()},
                        "after_over_before": statistics.median(ratios("before")), "ratios": ratios("before"),
                        "after_over_source": statistics.median(ratios("source")),
                        "source_ratios": ratios("source")})
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    print(f"\nbefore = {args.before}, after = this checkout; CPU float32, {os.cpu_count()} cores, batch 1, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} alternating rounds")
    print(f"{'model':<14} {'mode':<9} {'figure':<22} {'source':>9} {'before':>9} {'after':>9} {'after/before':>13}"
          f"  {'range':<12} {'after/source':>13}")
    for row in results:
        print(f"{row['model']:<14} {row['mode']:<9} {row['figure']:<22} {row['source']:>9.1f} {row['before']:>9.1f} "
              f"{row['after']:>9.1f} {row['after_over_before']:>12.3f}x  "
              f"{min(row['ratios']):.3f}-{max(row['ratios']):.3f}  {row['after_over_source']:>12.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"before": args.before, "settings": vars(args) | {"json": None},
                                         "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
