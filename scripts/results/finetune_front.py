"""What a few minutes of LoRA fine-tuning wins back on an export, next to `heal` (docs/finetune.md).

SmolLM2-135M exported at 25 of 30 blocks with the default plan (smollm2_plans: 25/search), then LoRA (peft, rank 16,
the seven usual targets, lr 1e-3, batches of 4 windows of 512 tokens) trained on the same calibration text heal reads
(`wiki`, its calib windows: 32768 tokens, as heal_front's distill rows) for each number of steps, merged, and measured on
the two texts heal_front measures (news; wiki held-out windows heal never reads). Recovered fraction of the gap as
heal_front: (ln ppl_unhealed - ln ppl_tuned) / (ln ppl_unhealed - ln ppl_source).

    .venv/bin/python scripts/results/finetune_front.py --minutes 3,8 --json docs/finetune.json   # docs' rows
    .venv/bin/python scripts/results/finetune_front.py --steps 10,40                             # fixed steps

A budget in minutes trains until it is spent (as a user with a few minutes would); how many steps fit depends on
what else the machine runs, so each row gives its steps and training seconds. --steps trains a fixed number.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from heal_front import SEQ_LEN, eval_windows, log, recovered  # noqa: E402
from smollm2_plans import SMOLLM2_PLANS  # noqa: E402

from lpconvert.texts import resolve_text, tokenize_windows  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            chunk = ids[start:start + batch]
            logits = model(chunk, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def lora_tune(export: Path, train: torch.Tensor, steps: int | None, seconds: float | None, lr: float, rank: int
              ) -> tuple[object, dict]:
    """LoRA for `steps` steps, or until `seconds` are spent; merged."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr)
    lora.train()
    generator = torch.Generator().manual_seed(0)
    started, losses = time.perf_counter(), []
    while (len(losses) < steps) if steps is not None else (time.perf_counter() - started < seconds):
        batch = train[torch.randint(0, train.shape[0], (4,), generator=generator)]
        loss = lora(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    trained = time.perf_counter() - started
    return lora.merge_and_unload(), {"steps": len(losses), "train_seconds": round(trained, 1),
                                     "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", help="training budgets in minutes, comma-separated")
    parser.add_argument("--steps", default="10,40", help="training steps (batches of 4 windows), comma-separated; "
                        "ignored with --minutes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--news-windows", type=int, default=32)
    parser.add_argument("--wiki-windows", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    pairs = SMOLLM2_PLANS[(25, "search")]
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "lp25"
        subprocess.run([str(ROOT / ".venv/bin/lpconvert"), "--progress", "off", "export", "smollm2-135m", "--pairs",
                        ",".join(map(str, pairs)), "-o", str(export), "--dtype", "float32"], check=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(export)
        texts = eval_windows(tokenizer, args.news_windows, args.wiki_windows)
        train = tokenize_windows(tokenizer, resolve_text("wiki"), seq_len=SEQ_LEN,
                                 num_tokens=32768, seed=0, split="calib").input_ids
        log(f"training windows {tuple(train.shape)}")
        unhealed = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
        rows = [{"method": "unhealed", **{name: perplexity(unhealed, ids) for name, ids in texts.items()}}]
        log(f"unhealed {rows[0]}")
        budgets = [(None, 60 * float(m), f"lora {m} min") for m in args.minutes.split(",")] if args.minutes \
            else [(int(n), None, f"lora {n} steps") for n in args.steps.split(",")]
        for steps, seconds, name in budgets:
            merged, info = lora_tune(export, train, steps, seconds, args.lr, args.rank)
            row = {"method": name, **info,
                   **{name: perplexity(merged, ids) for name, ids in texts.items()}}
            log(str(row))
            rows.append(row)
    source = json.loads((ROOT / "docs/heal_front.json").read_text())["source"]
    for row in rows[1:]:
        for name in texts:
            row[f"recovered_{name}"] = recovered(rows[0][name], row[name], source[name])
    print(f"{'method':<16} {'news':>8} {'wiki held-out':>14} {'recovered news':>15} {'steps':>6}")
    for row in rows:
        print(f"{row['method']:<16} {row['news']:8.2f} {row['wiki_heldout']:14.2f} "
              f"{row.get('recovered_news', float('nan')):15.2f} {row.get('steps', ''):>6}")
    if args.json:
        args.json.write_text(json.dumps({"pairs": pairs, "settings": vars(args) | {"json": str(args.json)},
                                         "source": source, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
