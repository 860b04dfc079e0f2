"""GGUF benchmark: SmolLM2-135M and its conversions in llama.cpp (llama-cpp-python), on this machine.

Every model is made the way a user makes it (`lpconvert export ... -o FILE.gguf`; the healed row with
`lpconvert heal` first), then, in one run:

- decode speed: tokens/s generating NEW tokens one at a time after a short prompt, every model in turn,
  ROUNDS times (interleaved, so drift in the machine's speed hits every model alike); the median;
- prefill speed: tokens/s reading a 512-token window in one call, the same way;
- perplexity on held-out news (the 300 Lee articles; calibration reads Wikipedia) through llama.cpp,
  next to transformers' perplexity of the safetensors export of the same plan on the same windows.

llama.cpp runs as people run it: its default f16 KV cache, flash attention as it decides, the same
thread count for every model. OMP_WAIT_POLICY=PASSIVE stops OpenMP's spin-waiting, which on 2 busy
cores makes decode times erratic.

    .venv/bin/python scripts/gguf_bench.py                        # the table in docs/benchmarks.md (about 15 min)
    .venv/bin/python scripts/gguf_bench.py --rounds 2 --windows 2 # a quick look
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before llama.cpp's OpenMP starts

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from heal_front import PLANS  # noqa: E402  (the pairs the CLI's defaults chose: docs/quality.md)

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
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="held-out news windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gguf_bench.json")
    args = parser.parse_args()

    tokenizer = resolve_model("smollm2-135m").load_tokenizer()
    windows = tokenize_windows(tokenizer, resolve_text("news"), seq_len=SEQ_LEN, num_tokens=args.windows * SEQ_LEN,
                               seed=0, split="all").input_ids
    prompt = windows[0, :64].tolist()
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        made = export_all(Path(tmp))
        results = {row: {"blocks": 30 - len(pairs), "pairs": pairs, "heal": method}
                   for row, (pairs, method) in ROWS.items()}
        for row in ROWS:
            log(f"transformers perplexity: {row}")
            results[row]["ppl_transformers"] = transformers_perplexity(made[row]["folder"], windows)
            for kind in TYPES:
                results[row][kind] = {"bytes": made[row][kind].stat().st_size}
        models = [(row, kind) for row in ROWS for kind in TYPES]
        opened = {}
        from contextlib import ExitStack

        with ExitStack() as stack:
            for row, kind in models:
                opened[row, kind] = stack.enter_context(open_gguf(made[row][kind], n_ctx=1024, exact=False,
                                                                  n_threads=args.threads, logits_all=True))
            for row, kind in models:
                log(f"llama.cpp perplexity: {row} {kind}")
                results[row][kind]["ppl_llama_cpp"] = llama_perplexity(opened[row, kind], windows)
            decode = {m: [] for m in models}
            prefill = {m: [] for m in models}
            for round_ in range(args.rounds):
                log(f"speed round {round_ + 1}/{args.rounds}")
                for m in models:
                    decode[m].append(args.new_tokens / decode_seconds(opened[m], prompt, args.new_tokens))
                    prefill[m].append(SEQ_LEN / prefill_seconds(opened[m], windows[0].tolist()))
            for row, kind in models:
                results[row][kind]["decode_tok_s"] = statistics.median(decode[row, kind])
                results[row][kind]["decode_runs"] = decode[row, kind]
                results[row][kind]["prefill_tok_s"] = statistics.median(prefill[row, kind])
                results[row][kind]["prefill_runs"] = prefill[row, kind]
    import llama_cpp

    report = {
        "model": "SmolLM2-135M-Instruct (built-in smollm2-135m)",
        "engine": f"llama-cpp-python {llama_cpp.__version__}", "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count(),
        "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
        "text": f"news, {args.windows} windows of {SEQ_LEN} tokens (seed 0)", "rows": results,
        "command": "scripts/gguf_bench.py " + " ".join(sys.argv[1:]),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    base = report["rows"]["30 (source)"]
    lines = ["| model | blocks | GGUF | size | decode tok/s (min-max) | vs source | prefill tok/s (min-max) | "
             "vs source | ppl llama.cpp | ppl transformers (f32) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in report["rows"].items():
        for kind in TYPES:
            g, b = r[kind], base[kind]
            lines.append(f"| {row} | {r['blocks']} | {kind} | {g['bytes'] / 1e6:.0f} MB | {g['decode_tok_s']:.1f} "
                         f"({min(g['decode_runs']):.1f}-{max(g['decode_runs']):.1f}) | "
                         f"{g['decode_tok_s'] / b['decode_tok_s']:.3f}x | {g['prefill_tok_s']:.0f} "
                         f"({min(g['prefill_runs']):.0f}-{max(g['prefill_runs']):.0f}) | "
                         f"{g['prefill_tok_s'] / b['prefill_tok_s']:.3f}x | {g['ppl_llama_cpp']:.3f} | "
                         f"{r['ppl_transformers']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
