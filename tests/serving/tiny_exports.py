"""The tiny exports that the serving checks (vllm_check.py, tp_check.py) run, and their reference log-probs.

One random model per architecture lpconvert supports, head_dim 32 (vLLM's CPU attention takes no smaller), 4
query heads and 2 KV heads (tensor parallelism of 2 divides every block), exported with block 0 wide and a
middle pair. The reference is single-process transformers in float32.
"""

from __future__ import annotations

from pathlib import Path

# Tensor parallelism shards these; a Gemma 3 pair keeps its branches apart through o_proj and down_proj (sandwich
# norms), which no plan shards: it runs on one device and under pipeline parallelism only (docs/serving.md).
TP_ARCHS = ("llama", "llama-bias", "mistral", "qwen2", "qwen3")
ARCHS = (*TP_ARCHS, "gemma3")
PAIRS = [0, 3]  # blocks [[0, 1], [2], [3, 4], [5]]: block 0 wide and a middle pair
BLOCKS = "[[0, 1], [2], [3, 4], [5]]"
PROMPTS = [[1, 5, 9, 33, 7, 100, 64, 2, 11, 90], [3, 3, 8, 120, 45, 6, 77, 19]]
TOLERANCE = 1e-3  # float32 log-probs
# A Qwen3 export whose pair heads keep the natural order (all of a's, then b's): correct on one device, wrong
# under tensor parallelism (a shard cannot tell which half's q/k norm its heads take). A negative control.
NATURAL_ORDER = "qwen3-natural-order"


def build_exports(root: Path, archs=ARCHS, natural_order_control: bool = False) -> dict[str, Path]:
    """Export every tiny architecture under ROOT: name -> export folder."""
    from builders import make_tiny_model, make_tiny_tokenizer

    from lpconvert.archs import Architecture
    from lpconvert.export import export, plan_for_pairs
    from lpconvert.sources import resolve_model

    folders = {}
    for arch in archs:
        source_dir = root / f"{arch}-source"
        make_tiny_model(arch, hidden_size=128, head_dim=32, intermediate_size=192).save_pretrained(source_dir)
        make_tiny_tokenizer(128).save_pretrained(source_dir)
        source = resolve_model(str(source_dir))
        export(source, plan_for_pairs(source, PAIRS, allow_edge_layers=True), root / arch)
        folders[arch] = root / arch
    if natural_order_control:
        source = resolve_model(str(root / "qwen3-source"))
        units = Architecture.head_units
        Architecture.head_units = lambda self, config: 1
        try:
            export(source, plan_for_pairs(source, PAIRS, allow_edge_layers=True), root / NATURAL_ORDER)
        finally:
            Architecture.head_units = units
        folders[NATURAL_ORDER] = root / NATURAL_ORDER
    return folders


def prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log p(token i+1 | tokens ..i) for each position of the prompt, as vLLM's prompt_logprobs report them."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # a DTensor under tensor parallelism
    logp = logits.float().log_softmax(-1)[0]
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def reference_logprobs(folder: Path) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return [prompt_logprobs(model, ids) for ids in PROMPTS]


def largest_difference(want: list[list[float]], got: list[list[float]]) -> float:
    return max(abs(a - b) for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
