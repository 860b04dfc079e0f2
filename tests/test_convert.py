"""Convert: the recipe round trip, the gate's exit codes, and what lands in OUT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpconvert.cli import app
from lpconvert.convert import load_recipe, recipe_yaml
from lpconvert.errors import LPError

FAST = """
score: {calib: news, tokens: 256, seq_len: 64, device: cpu}
plan: {target: {pairs: 1}, strategy: greedy, metric: pair_rel_l2}
eval: {text: news, split: all, tokens: 256, seq_len: 64, device: cpu, new_tokens: 4, %s}
"""


def _recipe(tmp_path, gate: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(FAST % gate)
    return str(path)


def test_recipe_written_back_loads_to_the_same_recipe_with_defaults_filled(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "max_ppl_increase: 50%"))
    assert recipe["plan"]["target"] == {"pairs": 1} and recipe["score"]["tokens"] == 256
    assert recipe["export"]["max_shard_size"] == "5GB"  # defaults fill what the recipe leaves out
    (tmp_path / "again.yaml").write_text(recipe_yaml(recipe))
    assert load_recipe(tmp_path / "again.yaml") == recipe


@pytest.mark.parametrize("content, message", [
    ("score: {tokns: 5}", "did you mean 'tokens'"),
    ("scroe: {}", "did you mean 'score'"),
    ("score: [1, 2", "not valid YAML"),
    ("plan: {target: {depth: 2, pairs: 1}}", "exactly one of"),
    # eval.engine and eval.tensor_parallel: the rules of --engine and --tensor-parallel (settings.EvalSettings)
    ("eval: {engine: vlm}", "eval.engine 'vlm' does not exist"),
    ("eval: {tensor_parallel: 0}", "eval.tensor_parallel"),
    ("eval: {tensor_parallel: 2}", "eval.tensor_parallel needs eval.engine: vllm"),
    ("eval: {engine: vllm, device: cpu}", "eval.device: cpu with eval.engine: vllm: vLLM runs where its build runs"),
])
def test_bad_recipe_files_are_refused_saying_what_is_wrong(tmp_path, content, message):
    (tmp_path / "r.yaml").write_text(content)
    with pytest.raises(LPError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_convert_passes_and_writes_everything(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(out), "--recipe",
                                      _recipe(tmp_path, "max_ppl_increase: 1000%"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["passed"] and len(summary["pairs"]) == 1
    for name in ("lpconvert-recipe.yaml", "lpconvert-scores.json", "lpconvert-plan.json", "lpconvert-eval.json",
                 "config.json", "modeling_lpconvert.py", "model.safetensors"):
        assert (out / name).exists(), name
    assert load_recipe(out / "lpconvert-recipe.yaml")["plan"]["target"] == {"pairs": 1}


def test_failed_gate_exits_1_and_leaves_nothing(tiny_models, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(tiny_models["llama"]), "-o", str(out), "--recipe", _recipe(tmp_path, "min_agreement: 1")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "agreement" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "lpconvert-tmp" in p.name]
    kept = CliRunner().invoke(app, [*args, "--keep-failed"])
    assert kept.exit_code == 1 and (out / "lpconvert-eval.json").exists()


# ----------------------------------------------------------------------------------------------
# Every value of a recipe is checked before any stage runs (lpconvert/settings.py)


@pytest.mark.parametrize("content, key, message", [
    ("score: {tokens: lots}", "score.tokens", "must be a positive integer, got 'lots'"),
    ("score: {tokens: 0}", "score.tokens", "positive integer"),
    ("score: {tokens: true}", "score.tokens", "positive integer, got true"),
    ("score: {seq_len: 1}", "score.seq_len", "at least 2"),
    ("score: {seed: 1.5}", "score.seed", "an integer"),
    ("score: {batch_size: 4.0}", "score.batch_size", "positive integer, got 4.0"),
    ("score: {loss_tokens: -5}", "score.loss_tokens", "positive integer"),
    ("score: {device: gpu}", "score.device", "did you mean 'cpu'"),
    ("score: {device: 'cuda:x'}", "score.device", "cuda:N"),
    ("score: {dtype: auto}", "score.dtype", "one of float32, bfloat16, float16"),
    ("score: {device_map: everywhere}", "score.device_map", "one of auto, balanced"),
    ("score: {metrics: loss}", "score.metrics", "list"),
    ("score: {metrics: []}", "score.metrics", "non-empty list"),
    ("score: {metrics: [loss, pair_eror]}", "score.metrics", "did you mean 'pair_error'"),
    ("score: {measure_loss: 'yes'}", "score.measure_loss", "true or false"),
    ("score: {calib: 12}", "score.calib", "non-empty string"),
    ("score: {text_field: ''}", "score.text_field", "non-empty string"),
    ('plan: {target: {depth: "five"}}', "plan.target.depth", "positive integer, got 'five'"),
    ("plan: {target: {depth: 5.5}}", "plan.target.depth", "positive integer, got 5.5"),
    ("plan: {target: {depth: 5.0}}", "plan.target.depth", "integer"),
    ("plan: {target: {depth: 0}}", "plan.target.depth", "positive integer"),
    ("plan: {target: {pairs: 0}}", "plan.target.pairs", "positive integer"),
    ("plan: {target: {speedup: 1}}", "plan.target.speedup", "above 1"),
    ("plan: {target: {speedup: .inf}}", "plan.target.speedup", "above 1"),
    ("plan: {target: {speedup: fast}}", "plan.target.speedup", "number"),
    ("plan: {target: {max_loss_increase: 0%}}", "plan.target.max_loss_increase", "positive percentage"),
    ("plan: {target: {max_loss_increase: lots}}", "plan.target.max_loss_increase", "percentage"),
    ("plan: {target: {depht: 3}}", "plan.target", "did you mean 'depth'"),
    ("plan: {target: 25}", "plan.target", "exactly one of"),
    ("plan: {target: null}", "plan.target", "exactly one of"),
    ("plan: {strategy: serach}", "plan.strategy", "did you mean 'search'"),
    ("plan: {metric: cosine}", "plan.metric", "pair_cosine"),
    ("plan: {objective: ppl}", "plan.objective", "one of top1, kl, loss"),
    ("plan: {candidates: 0}", "plan.candidates", "positive integer"),
    ("plan: {beam: 1.5}", "plan.beam", "positive integer"),
    ("plan: {verify: -1}", "plan.verify", "non-negative integer"),
    ("plan: {heldout_tokens: many}", "plan.heldout_tokens", "non-negative integer"),
    ("plan: {allow_edge_layers: 1}", "plan.allow_edge_layers", "true or false, got 1"),
    ("plan: {use_model: 'false'}", "plan.use_model", "unquoted"),
    ("plan: {dtype: float64}", "plan.dtype", "auto, float32, bfloat16, float16"),
    ("export: {max_shard_size: -1}", "export.max_shard_size", "size like 5GB"),
    ("export: {max_shard_size: 5000000}", "export.max_shard_size", "size like 5GB"),
    ("export: {max_shard_size: 5G}", "export.max_shard_size", "size like 5GB"),
    ("export: {max_shard_size: 0.5B}", "export.max_shard_size", "size like 5GB"),
    ("export: {max_shard_size: 1e400GB}", "export.max_shard_size", "size like 5GB"),
    ("export: {copy_tokenizer: 'no'}", "export.copy_tokenizer", "true or false, got 'no'"),
    ("export: {dtype: fp16}", "export.dtype", "one of auto, float32"),
    ("eval: {split: test}", "eval.split", "one of heldout, all"),
    ("eval: {new_tokens: -1}", "eval.new_tokens", "non-negative integer"),
    ("eval: {prompt: ' '}", "eval.prompt", "non-empty string"),
    ("eval: {max_ppl_increase: -5%}", "eval.max_ppl_increase", "percentage"),
    ("eval: {max_ppl_increase: lots}", "eval.max_ppl_increase", "percentage"),
    ("eval: {max_ppl_increase: .nan}", "eval.max_ppl_increase", "percentage"),
    ("eval: {min_agreement: 1.5}", "eval.min_agreement", "between 0 and 1"),
    ("eval: {min_agreement: high}", "eval.min_agreement", "between 0 and 1"),
    # combinations a stage would only refuse after scoring has run
    ("plan: {strategy: search, use_model: false}", "plan.strategy", "use_model"),
    ("plan: {tokens: 100, seq_len: 512}", "plan.tokens", "less than one window"),
    ("plan: {heldout_tokens: 100, seq_len: 512}", "plan.heldout_tokens", "less than one window"),
    ("plan: {metric: loss_increase}", "plan.metric", "measure_loss"),
    ("score: {metrics: [angular_distance]}\nplan: {metric: pair_cosine}", "plan.metric", "pair_error"),
    ("plan: {use_model: false, target: {max_loss_increase: 5%}}", "plan.target.max_loss_increase",
     "measured losses"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, content, key, message):
    (tmp_path / "r.yaml").write_text(content)
    with pytest.raises(LPError) as caught:
        load_recipe(tmp_path / "r.yaml")
    line = caught.value.one_line()
    assert f"recipe key {key} " in line and message in line, line
    assert "\n" not in line and caught.value.fix


@pytest.mark.parametrize("content", [
    "score: {seed: -1, device: 'cuda:1', device_map: auto, metrics: [loss], measure_loss: false}",
    "plan: {verify: 0, heldout_tokens: 0, strategy: null, metric: null, allow_edge_layers: true}",
    "plan: {target: {speedup: 2}}",
    "plan: {target: {max_loss_increase: 5%}}",
    "plan: {target: {max_loss_increase: '7 %'}}",
    "plan: {use_model: false, target: {pairs: 2}, tokens: 16, seq_len: 512}",  # no calibration: tokens unused
    "export: {max_shard_size: 2GiB, dtype: auto, copy_tokenizer: false}",
    "export: {max_shard_size: ' 500 mb '}",
    "eval: {max_ppl_increase: 0, min_agreement: 1, split: all}",
    "eval: {max_ppl_increase: null, min_agreement: null, dtype: float16}",
    "score: {measure_loss: true}\n"
    "plan: {use_model: false, metric: loss_increase, target: {max_loss_increase: 5%}}",
])
def test_edge_values_are_accepted(tmp_path, content):
    (tmp_path / "r.yaml").write_text(content)
    load_recipe(tmp_path / "r.yaml")


def test_recipe_keeps_values_as_written(tmp_path):
    # convert() and the copy of the recipe in OUT read '25%' as the user wrote it
    (tmp_path / "r.yaml").write_text("eval: {max_ppl_increase: 25%}\nplan: {target: {max_loss_increase: 3%}}")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe["eval"]["max_ppl_increase"] == "25%"
    assert recipe["plan"]["target"] == {"max_loss_increase": "3%"}


CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", sorted({"llama2-7b", "llama3.2-3b", "smollm2-135m"} |
                                        {path.stem for path in CONFIGS.glob("*.yaml")}))
def test_each_shipped_recipe_loads_with_a_target(name):
    path = CONFIGS / f"{name}.yaml"  # the three named recipes must exist, and every other one loads too
    assert load_recipe(path)["plan"]["target"]


def test_every_key_has_a_spec_and_every_default_passes():
    from lpconvert.convert import _section_defaults
    from lpconvert.settings import STAGES, TARGETS, check_setting, check_value

    defaults = _section_defaults()
    assert {stage: set(keys) for stage, keys in defaults.items()} == \
        {stage: set(specs) for stage, specs in STAGES.items()}
    for stage, keys in defaults.items():
        for key, value in keys.items():
            check_setting(stage, key, value, f"{stage}.{key}")
    for specs in (*STAGES.values(), TARGETS):  # the value a fix suggests must pass its own check
        for key, spec in specs.items():
            check_value(spec, spec.example, key)


def test_settings_choices_are_the_codes_own():
    from lpconvert import formats, plan, runtime, score, settings, texts

    assert settings.SCORE_METRICS == score.ALL_METRICS
    assert settings.DTYPES == tuple(runtime.DTYPES)
    assert settings.TEXT_SPLITS == texts.SPLITS
    assert settings.PLAN["strategy"].choices == plan.STRATEGIES
    assert settings.PLAN["objective"].choices == plan.OBJECTIVES
    assert settings.PLAN["dtype"].choices == runtime.COMPUTE_DTYPES
    assert settings.PLAN["metric"].choices == tuple(formats.PAIR_METRICS)
    assert tuple(settings.TARGETS) == tuple(plan.parse_target.__code__.co_varnames[:4])


SIZES = {"5GB": 5 * 10**9, "5 gb": 5 * 10**9, "1.5GiB": 3 * 2**29, "100B": 100, "7 mib ": 7 * 2**20,
         "1_000MB": 10**9, "5KIB": 5 * 2**10, "2TB": 2 * 10**12, "0.5B": None, "GB": None, "5G": None,
         "nanGB": None, "-1GB": None, "5XB": None, "": None, "inf MB": None, "1e400GB": None}


@pytest.mark.parametrize("text", list(SIZES))
def test_sizes_read_in_decimal_and_binary_units(text):
    from lpconvert.settings import parse_size, size_bytes

    assert size_bytes(text) == SIZES[text]
    if SIZES[text] is None:
        with pytest.raises(LPError, match="is not understood"):
            parse_size(text)
    else:
        assert parse_size(text) == SIZES[text]


def test_settings_import_stays_light():
    import subprocess
    import sys

    code = "import sys, lpconvert.settings; print('torch' in sys.modules or 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_command_line_values_are_checked_like_recipe_values_naming_the_option():
    from lpconvert.settings import check_setting, check_target

    assert check_setting("eval", "max_ppl_increase", "5%", "--max-ppl-increase") == pytest.approx(0.05)
    assert check_setting("eval", "max_ppl_increase", 0, "--max-ppl-increase") == 0  # the one bare number: 0 either way
    assert check_setting("score", "metrics", ["loss"], "--metrics") == ("loss",)
    assert check_setting("export", "max_shard_size", "2GiB", "--max-shard-size") == "2GiB"  # export parses it
    assert check_setting("plan", "target", {"speedup": 2}, "plan.target") == {"speedup": 2.0}
    assert check_target("max_loss_increase", "5%", "--max-loss-increase") == pytest.approx(0.05)
    with pytest.raises(LPError) as caught:
        check_setting("score", "tokens", "lots", "--tokens")
    assert caught.value.one_line() == "--tokens must be a positive integer, got 'lots' (e.g. --tokens 16384)"
    with pytest.raises(LPError, match="--depth must be a positive integer, got 5.5"):
        check_target("depth", 5.5, "--depth")
    with pytest.raises(LPError) as caught:
        check_setting("score", "metrics", "nope", "--metrics")
    assert caught.value.fix == "e.g. --metrics angular_distance,pair_error"


def test_bad_recipe_fails_before_any_stage(tiny_models, tmp_path, monkeypatch):
    import time

    import lpconvert.score

    def never(*args, **kwargs):
        raise AssertionError("this must never run")

    monkeypatch.setattr(lpconvert.score, "compute_scores", never)
    (tmp_path / "r.yaml").write_text("score: {tokens: lots}\nplan: {target: {depth: 5.5}}")
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "out"),
                                      "--recipe", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "recipe key score.tokens" in result.stderr, result.output
    assert time.perf_counter() - started < 5 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Issue 32: what a recipe says is never dropped silently, and what config.json settles is refused first


@pytest.mark.parametrize("content, message", [
    ("eval: {max_ppl_increase: 1%}\nscore: {tokens: 256}\neval: {tokens: 256}\n",
     "repeats the key 'eval' at line 3 (first at line 1)"),
    ("plan: {target: {depth: 3, depth: 4}}\n", "repeats the key 'depth' at line 1: YAML keeps only the last"),
    ("export: {gguf_type: q8_0}\n", "recipe key export.gguf_type applies only with export.format: gguf"),
    ("export: {format: safetensors, gguf_type: bf16}\n", "this recipe's export.format is safetensors"),
    ("heal: {lr: 0.001}\n", "recipe key heal.lr applies only with heal.method: distill"),
    ("heal: {method: lsq, train: output}\n", "recipe key heal.train applies only with heal.method: distill"),
])
def test_a_recipe_value_that_would_be_dropped_is_refused(tmp_path, content, message):
    (tmp_path / "r.yaml").write_text(content)
    with pytest.raises(LPError) as refused:
        load_recipe(tmp_path / "r.yaml")
    assert message in refused.value.one_line()


def test_merge_keys_and_keys_of_stages_that_are_off_at_their_defaults_are_fine(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "score: {tokens: 256, seq_len: 64}\n"
        "heal: {<<: {tokens: 512, seq_len: 64}, tokens: 1024, steps: 150}\n"  # YAML's own override; steps' default
        "export: {gguf_type: f16}\n")  # the default: the recipe copied into OUT writes every key out
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe["heal"]["tokens"] == 1024 and recipe["heal"]["seq_len"] == 64
    (tmp_path / "d.yaml").write_text("heal: {method: distill, steps: 10, lr: 0.001}\nexport: {format: gguf, "
                                     "gguf_type: q8_0}\n")
    assert load_recipe(tmp_path / "d.yaml")["heal"]["steps"] == 10


def test_an_impossible_target_and_a_model_too_large_are_refused_before_scoring(tiny_models, tmp_path, monkeypatch):
    import lpconvert.score
    from lpconvert import memory

    def must_not_score(*args, **kwargs):
        raise AssertionError("scoring ran before the target was checked")

    monkeypatch.setattr(lpconvert.score, "compute_scores", must_not_score)
    (tmp_path / "r.yaml").write_text("plan: {target: {depth: 2}}\n")
    result = CliRunner().invoke(app, ["convert", str(tiny_models["gemma3"]), "-o", str(tmp_path / "out"),
                                      "--recipe", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: recipe key plan.target.depth 2 needs 4 pairs, but at most 2 non-overlapping pairs fit in a model of "
        "6 layers, first and last layers excluded, local and global layers never paired together (depth 4 at least) "
        "(ask for depth 4 or more)")
    monkeypatch.setattr(memory, "available_memory", lambda device, spread=False: (2**20, "available (test)"))
    result = CliRunner().invoke(app, ["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "out"),
                                      "--recipe", _recipe(tmp_path, "max_ppl_increase: 10%")])
    assert result.exit_code == 2 and "error: score would need about" in result.stderr, result.output
    assert "score.dtype: bfloat16 halves the weights" in result.stderr and not (tmp_path / "out").exists()
