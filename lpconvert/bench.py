"""Bench: prefill and decode tokens/s in the runtime users run (transformers `generate`).

Modes: eager (the default dynamic cache) and `compile` (a static cache; transformers compiles the
decode step itself on CUDA, and on the CPU we wrap the forward in torch.compile). Decode speed is
timed step by step inside one generation of N+1 tokens, from the first new token (the prefill's) to
the last, so prefill does not count; each figure is the median of `repeats` runs after `warmup` runs.

`bench_random_weights` builds a source model with random weights at a real shape directly on the
device and converts it in memory: how a GPU machine without model files is measured.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from types import SimpleNamespace

import torch

from .errors import LPError
from .settings import BenchSettings  # noqa: F401  (the stage's API)

# Real shapes (Llama-family), for --random-weights.
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b-shape": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def middle_pairs(num_layers: int, count: int) -> list[int]:
    """`count` pairs in the middle of the stack (the region that tolerates pairing best)."""
    if count < 0 or 2 * count > num_layers - 2:
        raise LPError(f"{count} pairs do not fit in the middle of {num_layers} layers",
                      f"use at most {(num_layers - 2) // 2}")
    first = (num_layers - 2 * count) // 2
    return [first + 2 * k for k in range(count)]


RANDOM_POSITIONS = 4096  # the positions of every --random-weights model


def random_source_model(shape: str, dtype: torch.dtype, device: str):
    """A transformers Llama model of random weights at a real shape, built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise LPError(f"unknown shape '{shape}'", f"use one of {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=RANDOM_POSITIONS)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # non-trivial norm weights, so folding them matters
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prepare(model, settings: BenchSettings, device: str):
    """Return generate kwargs for the mode; on the CPU --compile wraps the forward ourselves."""
    kwargs = dict(do_sample=False, pad_token_id=0)
    if settings.compile:
        kwargs["cache_implementation"] = "static"
        if not device.startswith("cuda") and not getattr(model, "_lp_compiled", False):
            model.forward = torch.compile(model.forward)
            model._lp_compiled = True
    return kwargs


def measure(model, settings: BenchSettings, device: str, label: str,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """Prefill and decode tokens/s of one model, one row per batch size."""
    kwargs = _prepare(model, settings, device)
    rows = []
    vocab = model.config.vocab_size
    for batch in settings.batch_sizes:
        if progress:
            progress(f"{label}, batch {batch}")
        prompt = torch.randint(0, vocab, (batch, settings.prompt_len), device=device,
                               generator=torch.Generator(device=device).manual_seed(0))
        mask = torch.ones_like(prompt)

        for _ in range(settings.warmup):
            _time_decode(model, prompt, mask, settings.new_tokens, kwargs)
            _time_prefill(model, prompt, mask, device)
        decode, prefills = [], []
        for _ in range(settings.repeats):
            steps, seconds = _time_decode(model, prompt, mask, settings.new_tokens, kwargs)
            decode.append(steps * batch / seconds)
            prefills.append(settings.prompt_len * batch / _time_prefill(model, prompt, mask, device))
        rows.append({
            "model": label, "batch": batch, "mode": "compile" if settings.compile else "eager",
            "decode_tokens_per_s": statistics.median(decode), "decode_spread": [min(decode), max(decode)],
            "prefill_tokens_per_s": statistics.median(prefills), "prefill_spread": [min(prefills), max(prefills)],
        })
    return rows


class _TokenClock:
    """A `generate` streamer that reads the clock each time tokens come out: once when the prompt goes
    in, then once per generated token. transformers copies each step's tokens to the CPU before handing
    them over, which waits for the step's GPU work: a reading falls after its step has run."""

    def __init__(self):
        self.readings: list[float] = []

    def put(self, _tokens) -> None:
        self.readings.append(time.perf_counter())

    def put_at(self, _tokens, when: float) -> None:
        """Tokens that came out at `when` (time.perf_counter() read by the engine's own process: llama.cpp's)."""
        self.readings.append(when)

    def end(self) -> None:
        pass

    def decode(self) -> tuple[int, float]:
        """(decode steps, their seconds): from the first new token (the prefill's) to the last."""
        steps = len(self.readings) - 2
        if steps < 1:  # a generate that ignores its streamer argument
            raise RuntimeError("generate told bench's clock of no decode step: it needs a streamer argument, "
                               "told each new token as transformers' generate tells it")
        return steps, self.readings[-1] - self.readings[1]


def _time_decode(model, prompt, mask, new_tokens: int, kwargs: dict) -> tuple[int, float]:
    """`new_tokens` decode steps after the prefill's token, timed step by step inside one generate.

    Timing the steps themselves, not a long generate minus a short one, keeps prefill out without a
    difference of two noisy totals (which a loaded machine made zero or negative on small models)."""
    clock = _TokenClock()
    model.generate(prompt, attention_mask=mask, min_new_tokens=new_tokens + 1, max_new_tokens=new_tokens + 1,
                   streamer=clock, **kwargs)
    return clock.decode()


def _time_prefill(model, prompt, mask, device: str) -> float:
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model(prompt, attention_mask=mask, use_cache=False, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - started


def speedups(rows: list[dict], baseline: str) -> list[dict]:
    """Each model's decode and prefill speed relative to the baseline's, per batch size and mode."""
    base = {(r["batch"], r["mode"]): r for r in rows if r["model"] == baseline}
    out = []
    for row in rows:
        ref = base.get((row["batch"], row["mode"]))
        if row["model"] != baseline and ref:
            out.append({"model": row["model"], "baseline": baseline, "batch": row["batch"], "mode": row["mode"],
                        "decode": row["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
                        "prefill": row["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]})
    return out


def settings_json(settings: BenchSettings) -> dict:
    return {**asdict(settings), "batch_sizes": list(settings.batch_sizes)}


# ----------------------------------------------------------------------------------------------
# The stage


def _report(rows: list[dict], reference: str, settings: BenchSettings, device: str, **names) -> dict:
    report = {"rows": rows, "speedups": speedups(rows, reference), "settings": settings_json(settings),
              "device": device, **names}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    return report


def bench_random_weights(shape: str, pair_counts: list[int], settings: BenchSettings,
                         progress: Callable[[str], None] | None = None) -> dict:
    """A source of random weights at SHAPE, built on the device, and its conversions with each count of
    middle pairs (converted in memory): how a GPU machine without model files is measured."""
    from .blocks import convert_in_memory
    from .runtime import check_positions, dtype_from_name, resolve_device

    device, dtype = resolve_device(settings.device), dtype_from_name(settings.dtype)
    # checked before a 7B model is built on the device, not after
    check_positions(shape, SimpleNamespace(max_position_embeddings=RANDOM_POSITIONS),
                    settings.prompt_len + settings.new_tokens, "--prompt-len + --new-tokens")
    if shape in SHAPES:
        for count in pair_counts:
            middle_pairs(SHAPES[shape]["num_hidden_layers"], count)
    source = random_source_model(shape, dtype, device)
    plans = [(count, middle_pairs(source.config.num_hidden_layers, count)) for count in pair_counts]
    rows = measure(source, settings, device, "source", progress)
    for count, pairs in plans:
        converted = convert_in_memory(source, pairs, name=f"{shape} random")
        rows += measure(converted, settings, device, f"lp-{count}", progress)
        del converted
    return _report(rows, "source", settings, device, random_weights=shape, model=None, baseline=None)


def _check_gguf_bench(target, baseline, ggufs: list, settings: BenchSettings) -> None:
    """A GGUF is timed in llama.cpp, one sequence at a time, against another GGUF (the same engine)."""
    if baseline is not None and len(ggufs) == 1:
        raise LPError("one model is a GGUF (llama.cpp) and the other is not (transformers): a speedup across "
                      "engines measures the engines", "time the GGUF against the source as a GGUF: lpconvert "
                      "export SOURCE --pairs none -o source.gguf, then --baseline source.gguf")
    if tuple(settings.batch_sizes) != (1,) or settings.compile:
        raise LPError("a GGUF is timed in llama.cpp one sequence at a time, without --compile",
                      "drop --batch-size and --compile")


def bench_models(target, baseline, settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict:
    """TARGET (a resolved source, e.g. a converted folder) and, if given, BASELINE timed in one process
    under the same settings; both must come from one source model (a source and its export, or two
    exports of it, in either order)."""
    from .formats import check_same_origin
    from .runtime import dtype_from_name, resolve_device

    device, dtype = resolve_device(settings.device), dtype_from_name(settings.dtype)
    if baseline is not None:
        check_same_origin(target, baseline)
    ggufs = [m for m in (target, baseline) if getattr(m, "kind", None) == "llama.cpp"]
    if ggufs:
        _check_gguf_bench(target, baseline, ggufs, settings)
        device = "cpu"  # where the prompts are drawn; llama.cpp runs on the CPU threads it is given
        for gguf in ggufs:
            gguf.all_logits = False  # a timed prefill computes the last position's logits only, as in transformers
    for checked in (target, baseline):
        if checked is not None:
            check_positions_for(checked, settings)
    held = [m for m in (target, baseline) if m is not None and m not in ggufs]  # in transformers, at once
    if held:
        from .memory import check_fits, memory_fixes, option_setter

        fixes = memory_fixes(option_setter, dtype=settings.dtype)
        if len(held) == 2:
            fixes.append("drop --baseline (time the model alone)")
        check_fits(held[0], stage="bench", dtype=settings.dtype, device=device, copies=len(held), fixes=fixes,
                   second="its baseline")
    model = target.load_model(dtype=dtype, device=device)
    rows: list[dict] = []
    if baseline is not None:
        base_model = baseline.load_model(dtype=dtype, device=device)
        rows += measure(base_model, settings, device, "baseline", progress)
        if hasattr(base_model, "close"):
            base_model.close()
        del base_model
    rows += measure(model, settings, device, "model", progress)
    if hasattr(model, "close"):
        model.close()
    report = _report(rows, "baseline", settings, device, random_weights=None, model=target.name,
                     baseline=None if baseline is None else baseline.name)
    if ggufs:  # the weights' type is the file's, and there is one way to run it
        report["device"] = f"cpu (llama.cpp, {os.cpu_count()} threads)"
        report["settings"]["dtype"] = "as stored in the GGUF"
        for row in rows:
            row["mode"] = "llama.cpp"
        report["speedups"] = speedups(rows, "baseline")
    return report


def bench_models_vllm(target, baseline, settings: BenchSettings, progress: Callable[[str], None] | None = None
                      ) -> dict:
    """TARGET and BASELINE in vLLM (settings.engine "vllm", over settings.tensor_parallel devices), each in its own
    engine with the same options, all started before any timing; the rounds interleave the models. `--compile` is vLLM's compiled mode (torch.compile, and CUDA graphs on a GPU);
    without it, enforce_eager. Batch B is B requests at once."""
    from .formats import check_same_origin
    from .vllmengine import check_servable, engine_options, run_job

    tensor_parallel = settings.tensor_parallel
    models = [("model", target)] + ([] if baseline is None else [("baseline", baseline)])
    if baseline is not None:
        check_same_origin(target, baseline)
    for _, model in models:
        check_servable(model, tensor_parallel)
        check_positions_for(model, settings)
    job = {"kind": "bench", "settings": settings_json(settings),
           "engine": engine_options([model for _, model in models], settings.prompt_len + settings.new_tokens + 1,
                                    settings.dtype, tensor_parallel, settings.compile,
                                    max_num_seqs=max(settings.batch_sizes)),
           "models": [{"label": label, "path": str(model.path)} for label, model in reversed(models)]}
    answer = run_job(job, progress)
    mode = "vllm compiled" if settings.compile else "vllm eager"
    rows = sorted(answer["rows"], key=lambda row: (row["model"] != "baseline", row["batch"]))
    for row in rows:
        row["mode"] = mode
    report = _report(rows, "baseline", settings, f"{answer['vllm']}, tensor parallel {tensor_parallel}",
                     random_weights=None, model=target.name, baseline=None if baseline is None else baseline.name)
    report.update(engine="vllm", tensor_parallel=tensor_parallel, same_round_ratios=same_round_ratios(rows),
                  collectives_per_step=answer.get("collectives", {}))
    return report


def check_positions_for(model, settings: BenchSettings) -> None:
    from .runtime import check_positions

    check_positions(model.name, model.config, settings.prompt_len + settings.new_tokens,
                    "--prompt-len + --new-tokens")


def same_round_ratios(rows: list[dict]) -> list[dict]:
    """model / baseline decode speed within each round (the models take turns), and their median: steadier than a
    ratio of medians on a machine whose speed drifts."""
    base = {r["batch"]: r for r in rows if r["model"] == "baseline"}
    out = []
    for row in rows:
        ref = base.get(row["batch"])
        if row["model"] != "baseline" and ref and "decode_rounds" in row:
            ratios = [m / b for m, b in zip(row["decode_rounds"], ref["decode_rounds"], strict=True)]
            out.append({"model": row["model"], "batch": row["batch"], "decode_ratios": ratios,
                        "median": statistics.median(ratios)})
    return out
