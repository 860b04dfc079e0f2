"""GGUF benchmark: SmolLM2-135M and its conversions in llama.cpp (llama-cpp-python), on this machine.

Every model is made the way a user makes it (`lpconvert export ... -o FILE.gguf`; the healed row with
`lpconvert heal` first), then:

- perplexity on held-out news (the 300 Lee articles; calibration reads Wikipedia) through llama.cpp,
  next to transformers' perplexity of the safetensors export of the same plan on the same windows;
- decode speed: tokens/s generating NEW tokens one at a time after a 64-token prompt, and prefill
  speed: tokens/s reading a 512-token window in one call. Every model in turn, ROUNDS times
  (interleaved, so drift in the machine's speed hits every model alike), the median; under three
  runtimes (RUNTIMES: 1 thread, 2 threads sleeping between ops, 2 threads spinning), each in its
  own process because OpenMP reads OMP_WAIT_POLICY once.

llama.cpp runs as llama-cpp-python runs it by default: f16 KV cache, flash attention off.

    .venv/bin/python scripts/results/gguf_bench.py                        # the table in docs/benchmarks.md (about 20 min)
    .venv/bin/python scripts/results/gguf_bench.py --rounds 2 --windows 2 # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from smollm2_plans import SMOLLM2_PLANS as PLANS  # noqa: E402  (the pairs the CLI's defaults chose: docs/quality.md)

from lpconvert.llamacpp import decode_seconds, nll, open_gguf  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402
from lpconvert.texts import resolve_text, tokenize_windows  # noqa: E402

# row -> (pairs, heal method or None): the source, the default plans at 27 and 25 blocks, and 25 healed (lsq)
ROWS = {"30 (source)": ([], None), "27/search": (PLANS[(27, "search")], None),
        "25/search": (PLANS[(25, "search")], None), "25/search + lsq": (PLANS[(25, "search")], "lsq")}
TYPES = ("f16", "q8_0")
SEQ_LEN = 512


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lpconvert(*arguments: str) -> None:
    command = [str(ROOT / ".venv/bin/lpconvert"), "--progress", "off", *arguments]
    log("$ lpconvert " + " ".join(arguments))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def export_all(folder: Path) -> dict:
    """Row -> {"folder": safetensors export, TYPE: GGUF path}."""
    made = {}
    for row, (pairs, method) in ROWS.items():
        name = row.split()[0].replace("/", "-") + (f"-{method}" if method else "")
        spec = ",".join(map(str, pairs)) or "none"
        made[row] = {"folder": folder / name}
        lpconvert("export", "smollm2-135m", "--pairs", spec, "-o", str(folder / name))
        pairs_or_plan = ["--pairs", spec]
        if method:  # heal the plan of the plain export, then export it healed, as a user would
            plan, heal = folder / f"{name}-plan.json", folder / f"{name}-heal.safetensors"
            plan.write_text((folder / name / "lpconvert-plan.json").read_text())
            lpconvert("heal", "smollm2-135m", "--plan", str(plan), "--method", method, "-o", str(heal))
            pairs_or_plan = ["--plan", str(plan), "--heal", str(heal)]
            made[row]["folder"] = folder / f"{name}-healed"
            lpconvert("export", "smollm2-135m", *pairs_or_plan, "-o", str(made[row]["folder"]))
        for kind in TYPES:
            made[row][kind] = folder / f"{name}-{kind}.gguf"
            lpconvert("export", "smollm2-135m", *pairs_or_plan, "-o", str(made[row][kind]), "--gguf-type", kind)
    return made


def transformers_perplexity(folder: Path, windows: torch.Tensor) -> float:
    model = resolve_model(str(folder)).load_model(dtype=torch.float32)
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    return math.exp(total / count)


def llama_perplexity(llm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows:
        value, n = nll(llm, window.tolist())
        total, count = total + value, count + n
    return math.exp(total / count)


def prefill_seconds(llm, ids: list[int]) -> float:
    return llm.prefill_seconds(ids)  # timed in llama.cpp's process


# How llama.cpp's threads run decode: each setting in its own process, as OpenMP reads its wait policy at start.
# On 2 cores, a thread that sleeps between ops (PASSIVE) must be woken at every op's barrier; one that
# spins (ACTIVE) is ready at once but competes for the core with anything else running.
RUNTIMES = {"1 thread": (1, "PASSIVE"), "2 threads, passive": (2, "PASSIVE"), "2 threads, active": (2, "ACTIVE")}


def time_models(paths: dict[str, str], threads: int, rounds: int, prompt: list[int], window: list[int],
                new_tokens: int) -> dict:
    """Decode and prefill tokens/s of every model, `rounds` times in turn; runs in a child process."""
    from contextlib import ExitStack

    runs = {name: {"decode": [], "prefill": []} for name in paths}
    with ExitStack() as stack:
        opened = {name: stack.enter_context(open_gguf(Path(path), n_ctx=1024, exact=False, n_threads=threads))
                  for name, path in paths.items()}
        for round_ in range(rounds):
            log(f"  round {round_ + 1}/{rounds}")
            for name, llm in opened.items():
                runs[name]["decode"].append(new_tokens / decode_seconds(llm, prompt, new_tokens))
                runs[name]["prefill"].append(len(window) / prefill_seconds(llm, window))
    return {name: {"decode_tok_s": statistics.median(r["decode"]), "decode_runs": r["decode"],
                   "prefill_tok_s": statistics.median(r["prefill"]), "prefill_runs": r["prefill"]}
            for name, r in runs.items()}


def speeds_in_child(runtime: str, paths: dict[str, str], args, prompt: list[int], window: list[int]) -> dict:
    threads, policy = RUNTIMES[runtime]
    job = {"paths": paths, "threads": threads, "rounds": args.rounds, "prompt": prompt, "window": window,
           "new_tokens": args.new_tokens}
    log(f"speed, {runtime} (OMP_WAIT_POLICY={policy})")
    done = subprocess.run([sys.executable, __file__, "--time-models", json.dumps(job)], check=True,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_WAIT_POLICY": policy})
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="held-out news windows of 512 tokens")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gguf_bench.json")
    parser.add_argument("--time-models", help=argparse.SUPPRESS)  # the child of speeds_in_child
    args = parser.parse_args()
    if args.time_models:
        job = json.loads(args.time_models)
        print(json.dumps(time_models(job["paths"], job["threads"], job["rounds"], job["prompt"], job["window"],
                                     job["new_tokens"])))
        return

    tokenizer = resolve_model("smollm2-135m").load_tokenizer()
    windows = tokenize_windows(tokenizer, resolve_text("news"), seq_len=SEQ_LEN, num_tokens=args.windows * SEQ_LEN,
                               seed=0, split="all").input_ids
    prompt, window = windows[0, :64].tolist(), windows[0].tolist()
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        made = export_all(Path(tmp))
        results = {row: {"blocks": 30 - len(pairs), "pairs": pairs, "heal": method}
                   for row, (pairs, method) in ROWS.items()}
        for row in ROWS:
            log(f"transformers perplexity: {row}")
            results[row]["ppl_transformers"] = transformers_perplexity(made[row]["folder"], windows)
            for kind in TYPES:
                results[row][kind] = {"bytes": made[row][kind].stat().st_size, "speed": {}}
                log(f"llama.cpp perplexity: {row} {kind}")
                with open_gguf(made[row][kind], n_ctx=1024, exact=False, logits_all=True) as llm:
                    results[row][kind]["ppl_llama_cpp"] = llama_perplexity(llm, windows)
        paths = {f"{row}|{kind}": str(made[row][kind]) for row in ROWS for kind in TYPES}
        for runtime in RUNTIMES:
            for name, figures in speeds_in_child(runtime, paths, args, prompt, window).items():
                row, kind = name.split("|")
                results[row][kind]["speed"][runtime] = figures
    import llama_cpp

    report = {
        "model": "SmolLM2-135M-Instruct (built-in smollm2-135m)",
        "engine": f"llama-cpp-python {llama_cpp.__version__}", "cpu_count": os.cpu_count(),
        "runtimes": {name: {"threads": t, "OMP_WAIT_POLICY": p} for name, (t, p) in RUNTIMES.items()},
        "kv_cache": "llama.cpp's default (f16), flash attention off (llama-cpp-python's default)",
        "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "text": f"news, {args.windows} windows of {SEQ_LEN} tokens (seed 0)", "rows": results,
        "command": "scripts/results/gguf_bench.py " + " ".join(a for a in sys.argv[1:]),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    """Perplexity, then decode and prefill tokens/s per runtime (median; the ratio to the source's GGUF of the
    same type in parentheses)."""
    base = report["rows"]["30 (source)"]
    runtimes = list(report["runtimes"])
    head = ["model", "blocks", "GGUF", "size", "ppl llama.cpp", "ppl transformers (f32)",
            *[f"decode tok/s, {r}" for r in runtimes], *[f"prefill tok/s, {r}" for r in runtimes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in report["rows"].items():
        for kind in TYPES:
            g = r[kind]
            cells = [row, str(r["blocks"]), kind, f"{g['bytes'] / 1e6:.0f} MB", f"{g['ppl_llama_cpp']:.3f}",
                     f"{r['ppl_transformers']:.3f}"]
            for what in ("decode_tok_s", "prefill_tok_s"):
                for runtime in runtimes:
                    value, ref = g["speed"][runtime][what], base[kind]["speed"][runtime][what]
                    cells.append(f"{value:.1f} ({value / ref:.2f}x)" if what == "decode_tok_s"
                                 else f"{value:.0f} ({value / ref:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
