"""Why pairing Gemma-3-270M's layers 12 and 13 raises LAMBADA accuracy (issue 35, item 3; docs/tasks.md).

On the 200 LAMBADA-OpenAI items `lpconvert eval gemma3-270m OUT --tasks lambada --limit 200` scores (seed 0), scored
as lm-evaluation-harness scores them (context + word encoded whole; greedy-correct when every token of the word is
the argmax), for the source and variants of it:

* pair (12, 13): lpconvert's export with that pair (exact: the two-branch formula);
* skip 12, skip 13: the source with that layer removed (its output = its input);
* pair (13, 14), pair (14, 15): the neighbours docs/tasks.md measured.

Then, for the items the pair flips, what the source predicted instead: is the word in the passage already (LAMBADA's
last words are mostly names and nouns the passage has used: a copy), and is the source's wrong guess a word of the
passage too.

    .venv/bin/python scripts/results/gemma_lambada_pair.py --json docs/gemma_lambada_pair.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "lpconvert" / "harness"))
import data  # noqa: E402  (lpconvert's offline LAMBADA items; stands alone)


def items(limit: int, seed: int) -> list[dict]:
    split = data.lambada()["test"]
    chosen = sorted(random.Random(seed).sample(range(len(split)), limit))  # accuracy.choose_items
    return [split[i] | {"doc": i} for i in chosen]


def encode(tokenizer, context: str, target: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        target, context = context[-spaces:] + target, context[:-spaces]
    whole = tokenizer.encode(context + target)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def score(model, tokenizer, docs: list[dict]) -> list[dict]:
    rows = []
    with torch.no_grad():
        for doc in docs:
            context, target = encode(tokenizer, doc["context"], doc["target"])
            ids = torch.tensor([context + target[:-1]])
            logits = model(ids, logits_to_keep=len(target), use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            greedy = logp.argmax(-1).tolist()
            rows.append({"doc": doc["doc"], "correct": greedy == target,
                         "logprob": float(logp.gather(1, torch.tensor(target)[:, None]).sum()),
                         "guess": tokenizer.decode(greedy[:1]), "target": doc["target"]})
    return rows


def skipping(model, layer: int):
    """The model with `layer` removed (a residual layer whose update is zero)."""
    block = model.model.layers[layer]
    block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lpconvert.sources import resolve_model

    source = resolve_model("gemma3-270m").path
    tokenizer = AutoTokenizer.from_pretrained(source)
    docs = items(args.limit, args.seed)

    def load(path, **kwargs):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"source": lambda: load(source), "skip 12": lambda: skipping(load(source), 12),
                    "skip 13": lambda: skipping(load(source), 13)}
        for pair in (12, 13, 14):
            out = Path(tmp) / f"pair{pair}"
            subprocess.run([str(ROOT / ".venv/bin/lpconvert"), "--progress", "off", "export", "gemma3-270m",
                            "--pairs", str(pair), "-o", str(out), "--dtype", "float32"], check=True,
                           capture_output=True)
            variants[f"pair ({pair}, {pair + 1})"] = lambda out=out: load(out, trust_remote_code=True)
        for name, build in variants.items():
            started = time.perf_counter()
            results[name] = score(build(), tokenizer, docs)
            accuracy = 100 * sum(r["correct"] for r in results[name]) / len(docs)
            print(f"{name:<16} LAMBADA {accuracy:5.1f}%  ({time.perf_counter() - started:.0f} s)", flush=True)
    report = analyse(results, docs)
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, **report,
                                         "rows": results}, indent=1) + "\n")


def in_context(word: str, context: str) -> bool:
    return word.strip().lower() in {w.strip(".,;:!?\"'()").lower() for w in context.split()}


def analyse(results: dict, docs: list[dict]) -> dict:
    source, pair = results["source"], results["pair (12, 13)"]
    gained = [i for i, (s, p) in enumerate(zip(source, pair, strict=True)) if p["correct"] and not s["correct"]]
    lost = [i for i, (s, p) in enumerate(zip(source, pair, strict=True)) if s["correct"] and not p["correct"]]
    wrong = [i for i, s in enumerate(source) if not s["correct"]]

    def share(indices, test) -> float | None:
        return round(sum(map(test, indices)) / len(indices), 3) if indices else None

    summary = {
        "accuracy": {name: 100 * sum(r["correct"] for r in rows) / len(rows) for name, rows in results.items()},
        "pair_12_13_gained": len(gained), "pair_12_13_lost": len(lost),
        "target_in_passage": {"all items": share(range(len(docs)), lambda i: in_context(docs[i]["target"],
                                                                                            docs[i]["context"])),
                              "gained": share(gained, lambda i: in_context(docs[i]["target"], docs[i]["context"]))},
        "source_guess_in_passage": {
            "source wrong": share(wrong, lambda i: in_context(source[i]["guess"], docs[i]["context"])),
            "gained": share(gained, lambda i: in_context(source[i]["guess"], docs[i]["context"]))},
        "source_guess_is_short_word": {  # a function word or punctuation: 3 characters or fewer
            "source wrong": share(wrong, lambda i: len(source[i]["guess"].strip()) <= 3),
            "gained": share(gained, lambda i: len(source[i]["guess"].strip()) <= 3)},
        "mean_logprob_change_on_gained": round(sum(pair[i]["logprob"] - source[i]["logprob"] for i in gained)
                                               / max(1, len(gained)), 3),
    }
    examples = [{"target": docs[i]["target"], "source guess": source[i]["guess"], "pair guess": pair[i]["guess"],
                 "end of passage": docs[i]["context"][-120:]} for i in gained[:12]]
    return {"summary": summary, "gained_examples": examples}


if __name__ == "__main__":
    main()
