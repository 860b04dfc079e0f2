"""transformers' tensor parallelism on lpconvert exports: prompt log-probs under tp_plan="auto" against one process.

    python tests/serving/tp_check.py [--tp 2] [--json out.json]

Builds the tiny exports of tiny_exports.py (every architecture, block 0 wide and a middle pair), computes their
single-process log-probs, then loads each with `tp_plan="auto"` in TP processes (torchrun, gloo, on the CPU) and
compares. It also checks that a pair block's q_proj shard holds 1/TP of the block's rows, and runs a negative
control: a Qwen3 export with its pair heads in the natural order must come out wrong under TP (the check catches it).
Exit code 1 when an export differs or the control does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))  # run as a command (or by vLLM's Python, torchrun): `serving` and builders importable
from serving.tiny_exports import (  # noqa: E402
    BLOCKS,
    NATURAL_ORDER,
    PROMPTS,
    TOLERANCE,
    TP_ARCHS,
    build_exports,
    largest_difference,
    prompt_logprobs,
    reference_logprobs,
)

PAIR_BLOCK = 2  # blocks [[0, 1], [2], [3, 4], [5]]: the middle pair
CAUGHT = "caught (wrong or refused, as it must be)"


def tensor_parallel_option() -> dict:
    """from_pretrained's option for tensor parallelism by the config's plan (the keyword changed in transformers 5.x)."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def worker(root: Path, names: list[str]) -> None:
    """One tensor-parallel rank (under torchrun): every export's log-probs and its pair block's shard rows."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    tensor_parallel = tensor_parallel_option()
    found = {}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(root / name, trust_remote_code=True, dtype=torch.float32,
                                                     **tensor_parallel).eval()
        weight = model.model.layers[PAIR_BLOCK].self_attn.q_proj.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        config = model.config.per_layer_config[PAIR_BLOCK]
        found[name] = {"pair_q_rows_here": local.shape[0], "pair_q_rows": config.num_attention_heads * config.head_dim,
                       "fused": model.model.layers[PAIR_BLOCK].self_attn.fused}
        try:
            found[name]["logprobs"] = [prompt_logprobs(model, ids) for ids in PROMPTS]
        except RuntimeError as exc:  # the negative control may fail loudly rather than run wrong: also caught
            found[name]["error"] = str(exc).splitlines()[0]
    if dist.get_rank() == 0:
        (root / "tp.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def run(tp: int, root: Path) -> list[dict]:
    folders = build_exports(root, TP_ARCHS, natural_order_control=True)
    reference = {name: reference_logprobs(folder) for name, folder in folders.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
                    __file__, "--worker", str(root), *folders], check=True, env=env, timeout=600)
    found = json.loads((root / "tp.json").read_text())
    return [{"model": name, "blocks": BLOCKS, "tp": tp, "fused": found[name]["fused"], "error": found[name].get("error"),
             "max_abs_logprob_difference": (largest_difference(reference[name], found[name]["logprobs"])
                                            if "logprobs" in found[name] else float("nan")),
             "pair_q_rows_here": found[name]["pair_q_rows_here"], "pair_q_rows": found[name]["pair_q_rows"],
             "control": name == NATURAL_ORDER} for name in folders]


def verdict(row: dict) -> str:
    matches = row["max_abs_logprob_difference"] <= TOLERANCE  # False for NaN: it failed to run
    if row["control"]:
        return CAUGHT if not matches else "NOT CAUGHT"
    sharded = row["pair_q_rows_here"] * row["tp"] == row["pair_q_rows"] and not row["fused"]
    return "ok" if matches and sharded else "MISMATCH" if not matches else "NOT SHARDED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="processes (tensor-parallel size)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank, run by torchrun
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.names)
        return
    rows = run(args.tp, Path(tempfile.mkdtemp(prefix="lpconvert-tp-")))
    print(f"{'model':<22} {'tp':>3} {'max |TP - one process| log-prob':>33} {'pair q rows here / all':>24}")
    for row in rows:
        shard = f"{row['pair_q_rows_here']} / {row['pair_q_rows']}"
        print(f"{row['model']:<22} {row['tp']:>3} {row['max_abs_logprob_difference']:>33.2e} {shard:>24}  "
              f"{verdict(row)}" + (f": {row['error']}" if row["error"] else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if any(verdict(row) not in ("ok", CAUGHT) for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
