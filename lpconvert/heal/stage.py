"""The heal stage: load the source, fit the pairs of a plan, and return the heal file's tensors and report.

Pairs are fitted on the calibration windows of a text and judged on its held-out windows (the 1 in
HELDOUT_EVERY windows calibration never reads, texts.py): a pair's correction is kept only if the
model's held-out loss goes down with it.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass

import torch

from ..archs import architecture_for
from ..errors import LPError
from ..formats import Plan, check_fingerprint, content_digest, source_fingerprint
from ..healfile import HEALED_PARTS, heal_header, tensor_name
from ..memory import DTYPE_BYTES, Setter, check_fits, logits_bytes, memory_fixes, memory_plan, option_setter
from ..runner import LayerRunner
from ..runtime import check_positions, dtype_from_name, resolve_device, text_windows
from ..settings import HealSettings
from ..streaming import load_model
from .distill import heal_distill
from .lsq import heal_lsq, lsq_memory_bytes
from .streams import Progress, Streams


@dataclass
class HealResult:
    tensors: dict[str, torch.Tensor]  # the heal file's: export names -> float32
    corrections: dict[int, dict[str, torch.Tensor]]  # the same, by pair start and projection (LayerRunner's)
    header: dict  # the heal file's metadata
    report: dict  # the header and how it went: per pair, time, memory


def _windows(source, s: HealSettings):
    from ..texts import tokenize_windows

    tokenizer = source.load_tokenizer()
    text, calib = text_windows(tokenizer, s.calib, text_field=s.text_field, tokens=s.tokens, seq_len=s.seq_len,
                               seed=s.seed, split="calib", also_tokens=s.heldout_tokens)
    heldout = tokenize_windows(tokenizer, text, seq_len=s.seq_len, num_tokens=s.heldout_tokens, seed=s.seed,
                               split="heldout")
    vocab = source.config.vocab_size
    if int(calib.input_ids.max()) >= vocab:
        raise LPError(f"the tokenizer of {source.name} produces ids beyond the model's vocabulary ({vocab})",
                      "use the model's own tokenizer files")
    return calib, heldout


def _check_settings(s: HealSettings) -> None:
    for key, value in (("tokens", s.tokens), ("heldout_tokens", s.heldout_tokens)):
        if value < s.seq_len:
            raise LPError(f"--{key.replace('_', '-')} {value} is less than one window of --seq-len {s.seq_len}",
                          f"use --{key.replace('_', '-')} {s.seq_len} or more")


def changed_tensors(runner: LayerRunner, plan: Plan) -> dict[str, torch.Tensor]:
    """The corrections that differ from the pairs' own weights, under the export's names."""
    tensors = {}
    for pair, fitted in sorted(runner.corrections.items()):
        for projection, weight in fitted.items():
            original, _ = runner.projection(pair, projection)
            if not torch.equal(weight.detach().to(original.dtype), original):
                tensors[tensor_name(plan, pair, projection)] = weight.detach().float().cpu()
    return tensors


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def check_heal_memory(source, s: HealSettings, device: str, setter: Setter = option_setter) -> str:
    """The model (a layer at a time, or whole), the streams of every window (calibration and held-out, kept at the
    current layer), a pair's least-squares fit (lsq.lsq_memory_bytes: its float64 Gram and in-place solve) and a
    batch's logits must fit (memory.py). Returns the memory plan, one line to print."""
    config = source.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    windows = math.ceil(s.tokens / s.seq_len) * (2 if s.target == "global" else 1) + math.ceil(s.heldout_tokens / s.seq_len)
    # the held-out streams twice: kept at the pair, and run on to the head to measure a loss
    windows += math.ceil(s.heldout_tokens / s.seq_len)
    working = windows * s.seq_len * hidden * DTYPE_BYTES[s.dtype] + lsq_memory_bytes(config, device.split(":")[0])
    working += logits_bytes(config, s.batch_size, s.seq_len)
    # distill backpropagates through every layer from the first pair up: autograd keeps their weights for the
    # step's backward pass, so a streamed model holds them all then (and reads them again every step)
    load = "whole" if s.method == "distill" else s.load
    check_fits(source, stage="heal", dtype=s.dtype, device=device, working=working, load=load,
               fixes=memory_fixes(setter, dtype=s.dtype, tokens=("tokens", "heldout_tokens")))
    return memory_plan(source, dtype=s.dtype, load=load, working=working)


def heal(source, plan: Plan, settings: HealSettings | None = None, progress: Progress = None,
         setter: Setter = option_setter) -> HealResult:
    """Fit the pairs of `plan` on `source` (settings.method: lsq, or lsq then distill). `setter` names settings
    in messages as the user wrote them (--dtype, or heal.dtype in a recipe)."""
    s = settings or HealSettings()
    started = time.perf_counter()
    fingerprint = source_fingerprint(source.config, source.store)
    check_fingerprint(plan.source, fingerprint, "the plan")
    if not plan.pairs:
        raise LPError("the plan has no pairs: there is nothing to heal", "heal a plan with at least one pair")
    arch = architecture_for(source.config)
    _check_settings(s)
    check_positions(source.name, source.config, s.seq_len, "--seq-len")
    device = resolve_device(s.device)
    check_heal_memory(source, s, device, setter)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if progress:
        progress(f"tokenising {s.calib}")
    calib, heldout = _windows(source, s)
    if progress:
        progress(f"loading {source.name} ({s.dtype} on {device})")
    model = load_model(source, dtype=dtype_from_name(s.dtype), device=device, load=s.load)
    model.requires_grad_(False)  # distill trains copies of the pairs' fused projections, nothing of the model
    runner = LayerRunner(model, seq_len=s.seq_len)
    pairs = sorted(plan.pairs)
    rows = heal_lsq(runner, pairs, Streams(runner, calib.input_ids, s.batch_size),
                    Streams(runner, heldout.input_ids, s.batch_size), target=s.target, damping=s.damping,
                    source=Streams(runner, calib.input_ids, s.batch_size) if s.target == "global" else None,
                    progress=progress)
    before, after = rows[0]["heldout_loss_before"], rows[-1]["heldout_loss_after"]
    distilled = None
    if s.method == "distill":
        batches = [calib.input_ids[i:i + 1] for i in range(calib.input_ids.shape[0])]
        distilled = heal_distill(runner, pairs, batches, Streams(runner, heldout.input_ids, s.batch_size),
                                 steps=s.steps, lr=s.lr, seed=s.seed, train=s.train, progress=progress)
        after = distilled["heldout_loss_after"]
    tensors = changed_tensors(runner, plan)
    for pair, row in zip(pairs, rows, strict=True):  # lsq's verdict, and whether the pair's weights changed at all
        row["changed"] = any(name in tensors for name in (tensor_name(plan, pair, part) for part in HEALED_PARTS))
    perplexity = {"unhealed": round(math.exp(before), 4), "healed": round(math.exp(after), 4),
                  "tokens": heldout.provenance["tokens"]}
    settings_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()}
    header = heal_header(source_name=source.name, fingerprint=fingerprint,
                         content_sha256=content_digest(arch, source.store), plan=plan, method=s.method,
                         settings={**settings_json, "device": device}, calibration=calib.provenance,
                         heldout=heldout.provenance, pairs=rows, perplexity=perplexity)
    report = {**header, "distill": distilled, "tensors": sorted(tensors),
              "seconds": round(time.perf_counter() - started, 1), "peak_memory_bytes": _peak_memory(device)}
    corrections = {p: {k: w.detach() for k, w in fitted.items()} for p, fitted in runner.corrections.items()}
    return HealResult(tensors=tensors, corrections=corrections, header=header, report=report)
