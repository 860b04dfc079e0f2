"""Evaluate: how much quality a converted model lost against its source, on held-out text.

Both models read the same windows of text. Reported: perplexity of each and the relative increase,
greedy next-token agreement (how often both pick the same next token), the mean KL divergence
KL(P_source || P_converted) of the next-token distributions, and a short greedy generation of each.
Bounds (`max_ppl_increase`, `min_agreement`) turn it into a gate for CI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

from . import __version__
from .checks import percent_text
from .formats import check_converted_from, check_same_tokenizer
from .memory import Setter, check_fits, logits_bytes, memory_fixes, memory_plan, option_setter, stream_bytes
from .runner import batches
from .runtime import check_positions, dtype_from_name, perplexity, resolve_device, text_windows
from .settings import EvalSettings  # noqa: F401  (the stage's API)


def _token_stats(source_logits: torch.Tensor, converted_logits: torch.Tensor, input_ids: torch.Tensor) -> dict:
    targets = input_ids[:, 1:].reshape(-1).to(source_logits.device)
    src = F.log_softmax(source_logits[:, :-1].float(), dim=-1).reshape(-1, source_logits.shape[-1])
    converted_logits = converted_logits.to(source_logits.device)  # a GGUF's come from llama.cpp, on the CPU
    conv = F.log_softmax(converted_logits[:, :-1].float(), dim=-1).reshape(-1, converted_logits.shape[-1])
    kl = (src.exp() * (src - conv)).sum(-1)
    return {
        "nll_source": float(-src.gather(1, targets[:, None]).sum().double()),
        "nll_converted": float(-conv.gather(1, targets[:, None]).sum().double()),
        "agree": int((src.argmax(-1) == conv.argmax(-1)).sum()),
        "kl": float(kl.sum().double()),
        "tokens": targets.numel(),
    }


def gate_failures(figures: dict, settings: EvalSettings) -> list[str]:
    """Why the converted model fails the gate, if it does. A figure that is not a finite number (a NaN or Inf
    logit, an overflowed weight) always fails: `nan > bound` is False, and a broken model must never pass."""
    broken = [name for name in ("perplexity_source", "perplexity_converted", "perplexity_increase", "kl_divergence")
              if figures[name] is not None and not math.isfinite(figures[name])]  # KL is None where not measured
    if broken:
        return [f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'} not finite "
                f"({', '.join(f'{figures[name]}' for name in broken)}): a model produced NaN or Inf"]
    failures = []
    increase, agreement = figures["perplexity_increase"], figures["agreement"]
    if settings.max_ppl_increase is not None and not increase <= settings.max_ppl_increase:
        failures.append(f"perplexity increase {percent_text(increase)} exceeds {percent_text(settings.max_ppl_increase)}")
    if settings.min_agreement is not None and not agreement >= settings.min_agreement:
        failures.append(f"agreement {agreement:.4g} is below {settings.min_agreement:.4g}")
    return failures


def _generate(model, tokenizer, prompt: str, new_tokens: int, device: str) -> str:
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def _transformers_totals(source, converted, windows: torch.Tensor, tokenizer, settings: EvalSettings, device: str,
                         progress) -> tuple[dict, dict]:
    dtype = dtype_from_name(settings.dtype)
    source_model = source.load_model(dtype=dtype, device=device)
    converted_model = converted.load_model(dtype=dtype, device=device)
    totals = {"nll_source": 0.0, "nll_converted": 0.0, "agree": 0, "kl": 0.0, "tokens": 0}
    chunks = list(batches(windows, settings.batch_size))
    with torch.inference_mode():
        for done, ids in enumerate(chunks, start=1):
            ids = ids.to(device)
            stats = _token_stats(source_model(ids).logits, converted_model(ids).logits, ids)
            for key, value in stats.items():
                totals[key] += value
            if progress:
                progress(done, len(chunks))
    return totals, _generations(source_model, converted_model, tokenizer, settings, device)


def _generations(source_model, converted_model, tokenizer, settings: EvalSettings, device: str) -> dict:
    """Each model's greedy continuation of the prompt (None with new_tokens 0); then a GGUF's llama.cpp process is
    closed."""
    generations = {"prompt": settings.prompt, "source": None, "converted": None}
    if settings.new_tokens:
        with torch.inference_mode():
            for label, model in (("source", source_model), ("converted", converted_model)):
                generations[label] = _generate(model, tokenizer, settings.prompt, settings.new_tokens, device)
                if hasattr(model, "weight_cache"):  # streamed: its last module is not held while the other runs
                    model.weight_cache.clear()
    if hasattr(converted_model, "close"):  # a GGUF in llama.cpp (llamacpp.LlamaCppLM)
        converted_model.close()
    return generations


def _streamed_totals(source, converted, windows: torch.Tensor, tokenizer, settings: EvalSettings, device: str,
                     progress) -> tuple[dict, dict]:
    """`_transformers_totals` with both models read a layer at a time (streaming.py), layer-major: every window through
    a layer before the next is read, the source first, then the converted model from the first layer it does not
    share with the source (the layers before its first pair, when their tensors are the same bytes, run once, for
    both). Kept: the stream of every window twice (at the shared layer, and the source's), a batch's logits of each.
    The generations read every layer once per new token."""
    from .streaming import LayerMajor, streamed_model

    dtype = dtype_from_name(settings.dtype)
    chunks = [ids.to(device) for ids in batches(windows, settings.batch_size)]
    in_llamacpp = getattr(converted, "kind", None) == "llama.cpp"
    # One module at a time is enough here (no pair runs two layers of one model at once): a 7B's wide block in
    # float32 is 1.6 GB, and a second cached one would double that.
    source_model = streamed_model(source, dtype, device, keep=1)
    converted_model = converted.load_model(dtype=dtype, device=device) if in_llamacpp else \
        streamed_model(converted, dtype, device, keep=1)
    steps = [0]

    def tick():
        steps[0] += 1
        if progress:
            progress(steps[0], total)

    with torch.inference_mode():
        source_run = LayerMajor(source_model, chunks)
        shared = 0 if in_llamacpp else shared_layers(source, converted)
        total = source_run.num_layers + (0 if in_llamacpp else converted.config.num_hidden_layers - shared) + 1
        prefix = source_run.inputs
        for i in range(shared):
            source_run.run(prefix, i, i + 1)
            tick()
        source_final = list(prefix)
        for i in range(shared, source_run.num_layers):
            source_run.run(source_final, i, i + 1)
            tick()
        source_model.weight_cache.clear()
        converted_run = None
        if not in_llamacpp:
            converted_run = LayerMajor(converted_model, chunks)
            if shared:
                converted_run.inputs = prefix  # the embedding and layers below the first pair: the source's
            for i in range(shared, converted_run.num_layers):
                converted_run.run(converted_run.inputs, i, i + 1)
                tick()
            converted_model.weight_cache.clear()
        totals = {"nll_source": 0.0, "nll_converted": 0.0, "agree": 0, "kl": 0.0, "tokens": 0}
        for b, ids in enumerate(chunks):
            converted_logits = converted_model(ids).logits if in_llamacpp else \
                converted_run.logits(converted_run.inputs[b])
            stats = _token_stats(source_run.logits(source_final[b]), converted_logits, ids)
            for key, value in stats.items():
                totals[key] += value
        tick()
    return totals, _generations(source_model, converted_model, tokenizer, settings, device)


def shared_layers(source, converted) -> int:
    """How many of the converted model's first blocks are the source's own layers with the same tensors (and the same
    embedding): the blocks below its first pair, unless the export changed their dtype or values."""
    blocks = getattr(converted.config, "lp_blocks", None)
    if not blocks or not _same_tensors(source.store, converted.store, "model.embed_tokens."):
        return 0
    shared = 0
    for block, layers in enumerate(blocks):
        if list(layers) != [block] or not _same_tensors(source.store, converted.store, f"model.layers.{block}."):
            break
        shared += 1
    return shared


def _same_tensors(a, b, prefix: str) -> bool:
    """Both stores hold the same tensors under `prefix`: the same names, dtypes, shapes and bytes (read to compare:
    reading a layer costs far less than running every window through it)."""
    infos_a, infos_b = a.infos(), b.infos()
    names = sorted(n for n in infos_a if n.startswith(prefix))
    if not names or names != sorted(n for n in infos_b if n.startswith(prefix)):
        return False
    if any(infos_a[n] != infos_b[n] for n in names):
        return False
    return all(torch.equal(a.read(n), b.read(n)) for n in names)


def _vllm_totals(source, converted, windows: torch.Tensor, settings: EvalSettings, progress) -> tuple[dict, dict, str]:
    """Both models in vLLM, one engine after the other, on the same token windows: summed log-probs of the text's
    tokens and how often the two engines' top tokens agree."""
    from .vllmengine import engine_options, run_job

    ids = windows.tolist()
    new_tokens = max(settings.new_tokens, 1)  # vLLM's worker always generates; dropped below with new_tokens 0
    job = {"kind": "logprobs", "windows": ids, "prompt": settings.prompt, "new_tokens": new_tokens,
           "engine": engine_options((source, converted), settings.seq_len + new_tokens + 64, settings.dtype,
                                    settings.tensor_parallel, compiled=False),
           "models": [{"label": label, "path": str(model.path),
                       "tokenizer": str(model.tokenizer_path) if getattr(model, "tokenizer_path", None) else None}
                      for label, model in (("source", source), ("converted", converted))]}
    answer = run_job(job, progress)
    src, conv = (answer["models"][label]["windows"] for label in ("source", "converted"))
    totals = {"nll_source": -sum(sum(w["logprobs"]) for w in src),
              "nll_converted": -sum(sum(w["logprobs"]) for w in conv),
              "agree": sum(a == b for s, c in zip(src, conv, strict=True) for a, b in zip(s["top"], c["top"], strict=True)),
              "kl": None, "tokens": sum(len(w["logprobs"]) for w in src)}
    generations = {"prompt": settings.prompt, **{label: answer["models"][label]["generation"] if settings.new_tokens
                                                  else None for label in ("source", "converted")}}
    return totals, generations, f"{answer['vllm']}, tensor parallel {settings.tensor_parallel}"


def check_eval_memory(source, converted, settings: EvalSettings, device: str, setter: Setter = option_setter) -> str:
    """Both models (eval holds two), and a batch's logits of each, must fit (memory.py). A GGUF export runs in
    llama.cpp beside the source: its file counts instead of a second copy. `converted` None: not written yet
    (convert checks before any work), a copy of the source's size."""
    in_llamacpp = getattr(converted, "kind", None) == "llama.cpp"
    working = logits_bytes(source.config, settings.batch_size, settings.seq_len, copies=2)
    if settings.load == "stream":  # every window's stream, twice (eval.streamed_totals), and a layer's temporaries
        working += stream_bytes(source.config, settings.tokens, settings.dtype, streams=3)
    if in_llamacpp:
        try:
            working += converted.path.stat().st_size
        except OSError:
            pass
    others = () if converted is None or in_llamacpp else (converted,)
    check_fits(source, stage="eval", dtype=settings.dtype, device=device, copies=1 if in_llamacpp else 2,
               working=working, load=settings.load, others=others, keep=1,
               fixes=memory_fixes(setter, dtype=settings.dtype, tokens=("tokens",) if settings.load == "stream" else ()))
    return memory_plan(source, dtype=settings.dtype, load=settings.load, working=working, copies=2, others=others,
                       keep=1)


def evaluate(source, converted, settings: EvalSettings, progress: Callable | None = None,
             setter: Setter = option_setter) -> dict:
    """Compare `converted` with `source` on held-out text; returns the report (with `passed`). `progress`: called
    (done, total) as windows or layers are done; with settings.engine "vllm", (text) as vLLM's worker reports.

    settings.engine "vllm": both models run in vLLM (vllmengine), which returns each position's log-prob and top
    token, not whole distributions: perplexity and agreement are measured, KL is not (null)."""
    started = time.perf_counter()
    engine = settings.engine
    if progress and engine == "transformers":
        progress(0, None)  # the step starts now: reading text and loading both models come first
    check_converted_from(converted, source)
    check_same_tokenizer(source, converted)
    check_positions(source.name, source.config, settings.seq_len, "--seq-len")
    if engine == "vllm":
        from .vllmengine import check_servable

        for model in (source, converted):
            check_servable(model, settings.tensor_parallel)
    device = resolve_device(settings.device) if engine == "transformers" else "vllm"
    memory = check_eval_memory(source, converted, settings, device, setter) if engine == "transformers" else None
    tokenizer = source.load_tokenizer()
    _, windows = text_windows(tokenizer, settings.text, text_field=settings.text_field, tokens=settings.tokens,
                              seq_len=settings.seq_len, seed=settings.seed, split=settings.split)
    if engine == "vllm":
        totals, generations, runs_in = _vllm_totals(source, converted, windows.input_ids, settings, progress)
    else:
        run = _transformers_totals if settings.load == "whole" else _streamed_totals
        totals, generations = run(source, converted, windows.input_ids, tokenizer, settings, device, progress)
        runs_in = "llama.cpp" if getattr(converted, "kind", None) == "llama.cpp" else "transformers"
    n = totals["tokens"]
    ppl_source = perplexity(totals["nll_source"] / n)
    ppl_converted = perplexity(totals["nll_converted"] / n)
    figures = {
        "perplexity_source": ppl_source,
        "perplexity_converted": ppl_converted,
        "perplexity_increase": ppl_converted / ppl_source - 1 if math.isfinite(ppl_source) else math.nan,
        "agreement": totals["agree"] / n,
        "kl_divergence": None if totals["kl"] is None else totals["kl"] / n,
        "tokens": n,
    }
    failures = gate_failures(figures, settings)
    return {
        "source": source.name,
        "converted": converted.name,
        "converted_depth": getattr(converted.config, "num_hidden_layers", None),
        "converted_runs_in": runs_in,
        "source_depth": source.config.num_hidden_layers,
        "text": windows.provenance,
        **figures,
        "generation": generations,
        "gate": {"max_ppl_increase": settings.max_ppl_increase, "min_agreement": settings.min_agreement},
        "passed": not failures,
        "failures": failures,
        "settings": {**asdict(settings), "device": device},
        "memory_plan": memory,
        "seconds": time.perf_counter() - started,
        "created_by": f"lpconvert {__version__}",
    }
