"""What fusing q/k/v and gate/up at load buys in transformers eager: the same export loaded fused (the default on
one device) and separate (`fuse_projections=False`, the layout tensor parallelism shards), timed in interleaved rounds.

    python scripts/bench_layout.py [--model smollm2-135m] [--pairs 14,17,20] [--rounds 5] [--json out.json]

Each round times both models with bench's own decode and prefill clocks (lpconvert bench), one after the other;
the table gives each model's median over the rounds and the same-round ratio fused / separate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the source to export")
    parser.add_argument("--pairs", default="14,17,20", help="the export's pairs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from lpconvert.bench import measure
    from lpconvert.export import export, plan_for_pairs
    from lpconvert.modeling.modeling_lpconvert import LPForCausalLM
    from lpconvert.settings import BenchSettings
    from lpconvert.sources import resolve_model

    torch.set_num_threads(torch.get_num_threads())
    source = resolve_model(args.model)
    out = Path(tempfile.mkdtemp(prefix="lpconvert-layout-")) / "export"
    export(source, plan_for_pairs(source, [int(p) for p in args.pairs.split(",") if p]), out)
    dtype = getattr(torch, args.dtype)
    models = {"fused (one device, default)": LPForCausalLM.from_pretrained(out, dtype=dtype).eval(),
              "separate (fuse_projections=False)": LPForCausalLM.from_pretrained(out, dtype=dtype,
                                                                                fuse_projections=False).eval()}
    def settings(warmup: int) -> BenchSettings:
        return BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=warmup, repeats=1,
                             device="cpu", dtype=args.dtype)

    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for i in range(args.rounds):
        for name, model in models.items():  # the first round warms each model up once
            rounds[name].append(measure(model, settings(1 if i == 0 else 0), "cpu", name)[0])
    fused, separate = rounds.values()
    ratios = {key: statistics.median(f[key] / s[key] for f, s in zip(fused, separate, strict=True))
              for key in ("decode_tokens_per_s", "prefill_tokens_per_s")}
    rows = [{"model": name, "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
             "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in rs),
             "decode_rounds": [r["decode_tokens_per_s"] for r in rs]} for name, rs in rounds.items()]
    print(f"{args.model} --pairs {args.pairs}, {args.dtype}, {torch.get_num_threads()} threads, batch 1, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} interleaved rounds")
    print(f"{'layout':<36} {'decode tok/s':>13} {'prefill tok/s':>14}")
    for row in rows:
        print(f"{row['model']:<36} {row['decode_tokens_per_s']:>13.1f} {row['prefill_tokens_per_s']:>14.1f}")
    print(f"same-round ratio fused / separate: decode {ratios['decode_tokens_per_s']:.3f}x, "
          f"prefill {ratios['prefill_tokens_per_s']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "rows": rows, "ratios": ratios},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
