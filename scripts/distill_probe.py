"""Distill probe: what heal's fine-tune wins back on its own held-out windows, by what it trains.

Fits lsq first (as `lpconvert heal --method distill` does), then runs heal's own fine-tune
(lpconvert.heal.distill.heal_distill) on SmolLM2-135M and prints its held-out trace, with the share
of the log-perplexity gap recovered on heal's held-out wiki windows:

    (ln ppl_unhealed - ln ppl) / (ln ppl_unhealed - ln ppl_source)

These are heal's own held-out windows (the ones that choose its corrections), not the texts of
scripts/heal_front.py: use it to compare settings quickly, and heal_front.py to report quality.

    .venv/bin/python scripts/distill_probe.py                                  # train all, 150 steps
    .venv/bin/python scripts/distill_probe.py --train output --steps 300 --tokens 16384
    .venv/bin/python scripts/distill_probe.py --train folded                  # input projections as folded products

--train folded trains q/k/v and gate/up as the folded tensors the export writes (each weight on its
own) instead of as each layer's weights and norm weight: the comparison in docs/quality.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lpconvert.heal import distill  # noqa: E402
from lpconvert.heal.lsq import heal_lsq  # noqa: E402
from lpconvert.heal.streams import Streams  # noqa: E402
from lpconvert.runner import LayerRunner  # noqa: E402
from lpconvert.runtime import text_windows  # noqa: E402
from lpconvert.sources import resolve_model  # noqa: E402
from lpconvert.texts import tokenize_windows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="7,17,19,24,26", help="pair starts (default: the 25-block search plan)")
    parser.add_argument("--train", default="all", choices=["all", "output", "folded"])
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens of the fine-tune")
    parser.add_argument("--lsq-tokens", type=int, default=16384, help="calibration tokens of the lsq start")
    parser.add_argument("--lsq-target", default="local", choices=["local", "global"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [int(p) for p in args.pairs.split(",")]
    source = resolve_model("smollm2-135m")
    tokenizer = source.load_tokenizer()
    model = source.load_model(dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    runner = LayerRunner(model, seq_len=512)
    text, calib = text_windows(tokenizer, "wiki", tokens=max(args.tokens, args.lsq_tokens), seq_len=512, seed=0,
                               split="calib", also_tokens=4096)
    heldout = tokenize_windows(tokenizer, text, seq_len=512, num_tokens=4096, seed=0, split="heldout").input_ids
    lsq_ids, tune_ids = calib.input_ids[:args.lsq_tokens // 512], calib.input_ids[:args.tokens // 512]
    probe = Streams(runner, heldout, 4)
    source_loss, unhealed = probe.loss([]), probe.loss(pairs)

    def report(label: str, loss: float) -> None:
        recovered = (unhealed - loss) / (unhealed - source_loss)
        print(f"{label}: held-out ppl {math.exp(loss):.3f}, recovered {recovered:.1%}", flush=True)

    print(f"source {math.exp(source_loss):.3f}, unhealed {math.exp(unhealed):.3f} "
          f"({heldout.numel()} held-out tokens)", flush=True)
    started = time.perf_counter()
    heal_lsq(runner, pairs, Streams(runner, lsq_ids, 4), Streams(runner, heldout, 4), target=args.lsq_target,
             damping=(0.3, 1.0, 3.0),
             source=Streams(runner, lsq_ids, 4) if args.lsq_target == "global" else None)
    report(f"lsq ({args.lsq_target}, {lsq_ids.numel()} tokens, {time.perf_counter() - started:.0f} s)",
           Streams(runner, heldout, 4).loss(pairs))
    train = args.train
    if train == "folded":
        # distill factors only the input projections it finds in INPUT_PROJECTIONS: without them it
        # trains the folded tensors as they are, like the output projections.
        distill.INPUT_PROJECTIONS = {}
        train = "all"
    result = distill.heal_distill(runner, pairs, [tune_ids[i:i + 1] for i in range(tune_ids.shape[0])],
                                  Streams(runner, heldout, 4), steps=args.steps, lr=args.lr, seed=0, train=train,
                                  eval_every=args.eval_every)
    for point in result["trace"]:
        report(f"step {point['step']:>4}", point["heldout_loss"])
    report(f"best (step {result['best_step']}, {result['seconds']:.0f} s of fine-tune)", result["heldout_loss_after"])


if __name__ == "__main__":
    main()
