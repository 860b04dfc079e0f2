"""vLLM decode and prefill speed of sources against their lpconvert exports, and the collectives per forward step
under tensor parallelism, counted.

    python scripts/results/vllm_bench.py [--parts tp1,tp2] [--rounds 5] [--json docs/vllm_bench.json]

tp1: SmolLM2-135M (30 layers) against its default 27- and 25-block exports (pairs 7,17,25 and 7,17,19,24,26:
docs/quality.md), one device. tp2: a random Llama with head counts two devices divide (16 query, 8 KV heads,
16 layers) against its export with 4 middle pairs (12 blocks), tensor parallel 2.

Every model of a part gets its own engine, all started before any timing (lpconvert/vllmworker.py, what
`lpconvert bench --engine vllm` runs); the rounds interleave the models, and the ratios are within a round. Times
are the engine core's own timestamps. vLLM runs under LPCONVERT_VLLM_PYTHON (default .venv-vllm/bin/python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from smollm2_plans import SMOLLM2_PLANS as PLANS

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_PLANS = {f"{depth} blocks": PLANS[(depth, "search")] for depth in (27, 25)}  # the default plans
RANDOM_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
RANDOM_PAIRS = [4, 6, 8, 10]  # 4 middle pairs: 12 blocks


def export_plans(source_name: str, plans: dict[str, list[int]], root: Path) -> dict[str, object]:
    """label -> resolved model: the source and each plan's export."""
    from lpconvert.export import export, plan_for_pairs
    from lpconvert.sources import resolve_model

    source = resolve_model(source_name)
    root.mkdir(parents=True, exist_ok=True)
    models = {"source": source}
    for label, pairs in plans.items():
        folder = root / label.replace(" ", "-")
        export(source, plan_for_pairs(source, pairs), folder)
        models[label] = resolve_model(str(folder))
    return models


def random_source(root: Path) -> str:
    """A Llama of random weights (norm weights too, so folding them matters) with the tiny test tokenizer."""
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import make_tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPE))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    folder = root / "random-source"
    model.save_pretrained(folder)
    make_tiny_tokenizer(128).save_pretrained(folder)
    return str(folder)


def run_part(name: str, models: dict, tensor_parallel: int, args) -> dict:
    from lpconvert.vllmengine import engine_options, run_job

    settings = {"batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                "warmup": 1, "repeats": args.rounds}
    job = {"kind": "bench", "settings": settings,
           "engine": engine_options(models.values(), args.prompt_len + args.new_tokens + 1, "float32",
                                    tensor_parallel, compiled=False, max_num_seqs=max(args.batch_sizes)),
           "models": [{"label": label, "path": str(model.path)} for label, model in models.items()]}
    answer = run_job(job, lambda text: print(f"  {name}: {text}", flush=True))
    rows = answer["rows"]
    source = {row["batch"]: row for row in rows if row["model"] == "source"}
    for row in rows:
        ref = source[row["batch"]]
        row["blocks"] = models[row["model"]].config.num_hidden_layers
        row["decode_ratio"] = statistics.median(m / s for m, s in zip(row["decode_rounds"], ref["decode_rounds"],
                                                                      strict=True))
        row["prefill_ratio"] = statistics.median(m / s for m, s in zip(row["prefill_rounds"], ref["prefill_rounds"],
                                                                       strict=True))
        row["collectives_per_step"] = answer["collectives"].get(row["model"], {})
    rows.sort(key=lambda row: (row["batch"], -row["blocks"]))
    return {"part": name, "tensor_parallel": tensor_parallel, "vllm": answer["vllm"], "rows": rows}


def print_part(part: dict, args) -> None:
    print(f"\n{part['part']}: {part['vllm']}, tensor parallel {part['tensor_parallel']}, eager, float32, "
          f"{os.cpu_count()} cores, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} rounds")
    print(f"{'model':<12} {'blocks':>6} {'batch':>5} {'decode tok/s':>13} {'vs source':>10} {'prefill tok/s':>14} "
          f"{'vs source':>10}  collectives per step")
    for row in part["rows"]:
        counts = ", ".join(f"{n:g} {name}" for name, n in row["collectives_per_step"].items()) or "-"
        print(f"{row['model']:<12} {row['blocks']:>6} {row['batch']:>5} {row['decode_tokens_per_s']:>13.1f} "
              f"{row['decode_ratio']:>9.3f}x {row['prefill_tokens_per_s']:>14.0f} {row['prefill_ratio']:>9.3f}x  "
              f"{counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="tp1,tp2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=lambda text: [int(b) for b in text.split(",")], default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("LPCONVERT_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))

    root = Path(tempfile.mkdtemp(prefix="lpconvert-vllm-bench-"))
    parts = []
    if "tp1" in args.parts:
        parts.append(run_part("tp1", export_plans("smollm2-135m", SMOLLM2_PLANS, root / "smollm2"), 1, args))
        print_part(parts[-1], args)
    if "tp2" in args.parts:
        models = export_plans(random_source(root), {"12 blocks": RANDOM_PAIRS}, root / "random")
        parts.append(run_part("tp2", models, 2, args))
        print_part(parts[-1], args)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "parts": parts}, indent=2,
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
