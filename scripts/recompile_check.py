"""Does the bench's sequence of `generate` calls recompile transformers' auto-compiled decode step?

On a GPU, transformers compiles the decode step of a static-cache `generate` by itself; this forces
the same auto-compile on the CPU (mode "default", no CUDA graphs) and replays `lpconvert.bench.measure`'s
call order: warm-up (a generate of N+1 tokens, a prefill), then repeats. It prints each call's time and
the number of graphs dynamo compiled so far: a repeat that takes seconds, or a growing count, is a
recompilation inside the timed runs.

    python scripts/recompile_check.py            # tiny random Llama, source model
    python scripts/recompile_check.py --pairs 3  # the same model converted with 3 middle pairs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lpconvert.bench import _time_decode, _time_prefill, middle_pairs, random_source_model  # noqa: E402
from lpconvert.blocks import convert_in_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--pairs", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = random_source_model(args.shape, torch.float32, "cpu")
    if args.pairs:
        model = convert_in_memory(model, middle_pairs(model.config.num_hidden_layers, args.pairs))
    compile_config = CompileConfig(fullgraph=True, mode="default", dynamic=False)
    compile_config._compile_all_devices = True  # transformers auto-compiles only on accelerators otherwise
    kwargs = dict(do_sample=False, pad_token_id=0, cache_implementation="static", compile_config=compile_config)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32))
    mask = torch.ones_like(prompt)
    calls = [("warm-up", "N+1"), ("warm-up", "prefill")]
    calls += [(f"repeat {r}", what) for r in (1, 2, 3) for what in ("N+1", "prefill")]
    for phase, what in calls:
        started = time.perf_counter()
        if what == "prefill":
            _time_prefill(model, prompt, mask, "cpu")
        else:
            _time_decode(model, prompt, mask, args.new_tokens, kwargs)
        print(f"{phase:9s} {what:8s} {time.perf_counter() - started:7.2f} s  graphs compiled: "
              f"{counters['stats']['unique_graphs']}", flush=True)


if __name__ == "__main__":
    main()
