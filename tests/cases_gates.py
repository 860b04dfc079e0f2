"""Issue 32's bad-input cases (gates): case_* functions, collected by tests/test_errors.py into its one table."""

from __future__ import annotations

import json
from pathlib import Path

from builders import QUICK_RECIPE, write_scores
from test_errors import Expect, _copy  # noqa: F401  (test_errors imports this module at its end)

# Llama-2-70B's shape: 69B parameters, 257 GiB in float32, more than any machine the suite runs on.
LLAMA_70B_SHAPE = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000)


def _claims_70b(t, p, **shape) -> Path:
    """The tiny Llama's folder whose config.json claims a 70B shape (or `shape`): its weights are never read, since
    the memory check reads the config before anything loads."""
    folder = _copy(t, "llama", p)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **LLAMA_70B_SHAPE, **shape}))
    return folder


def _claims_huge_layers(t, p) -> Path:
    """A config.json claiming layers of 49B parameters each: even one layer at a time (the default) is too much."""
    return _claims_70b(t, p, intermediate_size=2_000_000)


def _with_nan_weight(t, p, tensor: str = "model.layers.2.mlp.down_proj.weight") -> Path:
    """The tiny Llama with one weight of TENSOR set to NaN (a corrupted or overflowed checkpoint)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    weights = load_file(folder / "model.safetensors")
    weights[tensor][0, 0] = torch.nan
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _recipe(t, p, recipe: str, model: str = "llama", folder: Path | None = None):
    (p / "recipe.yaml").write_text(recipe)
    return ["convert", str(folder or t[model]), "-o", str(p / "out"), "--recipe", str(p / "recipe.yaml")]


# --- section 2: a model too large for the machine, refused before it loads ---


def case_memory_score_too_large(t, p):  # issue 33: streamed, the default
    folder = _claims_huge_layers(t, p)
    return ["score", str(folder), "-o", str(p / "out"), "--device", "cpu"], \
        f"score would need about 407.3 GiB to run {folder} a layer at a time (367.3 GiB of weights in float32 at " \
        "once + 2.2 GiB working + 37.7 GiB margin), more than the ", Expect(victims=[folder])


def case_memory_score_whole_too_large(t, p):
    folder = _claims_70b(t, p)
    return ["score", str(folder), "-o", str(p / "out"), "--device", "cpu", "--load", "whole"], \
        f"score would need about 283.5 GiB to hold {folder} (68.71B parameters in float32: 256.0 GiB + 0.9 GiB " \
        "working + 26.6 GiB margin), more than the ", Expect(victims=[folder])


def case_memory_score_names_bfloat16(t, p):
    folder = _claims_huge_layers(t, p)
    return ["score", str(folder), "-o", str(p / "out"), "--device", "cpu"], \
        "(--dtype bfloat16 halves the weights; fewer --tokens; ", Expect(victims=[folder])


def case_memory_score_bfloat16_still_too_large(t, p):  # bfloat16 asked already: not suggested again
    folder = _claims_huge_layers(t, p)
    return ["score", str(folder), "-o", str(p / "out"), "--device", "cpu", "--dtype", "bfloat16",
                                             "--measure-loss"], \
        "(fewer --tokens or --loss-tokens; LPCONVERT_SKIP_MEMORY_CHECK=1 tries anyway)", Expect(victims=[folder])


def case_memory_convert_names_recipe_keys(t, p):
    folder = _claims_huge_layers(t, p)
    return _recipe(t, p, QUICK_RECIPE, folder=folder), \
        "(score.dtype: bfloat16 halves the weights", Expect(victims=[folder])


# --- 7 and 21: NaN weights ---


def case_score_nan_weights(t, p):
    folder = _with_nan_weight(t, p)
    return ["score", str(folder), "-o", str(p / "out"), "--tokens", "256", "--seq-len", "64", "--calib", "news"], \
        "score measured NaN or Inf on " + str(folder) + ", starting at layer 2 " \
        "(model.layers.2.mlp.down_proj.weight holds NaN or Inf)", Expect(victims=[folder])


def case_plan_model_nan_weights(t, p):
    folder = _with_nan_weight(t, p)
    scores = write_scores(p / "scores.json", folder)
    return ["plan", str(scores), "--model", str(folder), "--pairs", "1", "-o", str(p / "out"), "--tokens", "256",
            "--seq-len", "64", "--calib", "news", "--heldout-tokens", "0"], \
        "plan measured NaN or Inf on " + str(folder) + ", starting at layer 2", Expect(victims=[folder, scores])


# --- 8: a key twice in a recipe ---


def case_recipe_duplicate_section(t, p):
    recipe = "eval: {max_ppl_increase: 1%}\nscore: {tokens: 256}\neval: {tokens: 256}\n"
    return _recipe(t, p, recipe), "repeats the key 'eval' at line 3 (first at line 1)", \
        Expect(victims=[p / "recipe.yaml"])


def case_recipe_duplicate_key_in_section(t, p):
    recipe = "eval:\n  max_ppl_increase: 1%\n  tokens: 256\n  max_ppl_increase: 50%\n"
    return _recipe(t, p, recipe), "repeats the key 'max_ppl_increase' at line 4 (first at line 2)"


# --- 17: an impossible target, refused from config.json before any work, naming the recipe's keys ---


def case_recipe_depth_impossible_before_scoring(t, p):
    return _recipe(t, p, "plan: {target: {depth: 2}}\n", model="gemma3"), \
        "recipe key plan.target.depth 2 needs 4 pairs, but at most 2 non-overlapping pairs fit in a model of 6 layers"


def case_recipe_pairs_impossible_names_the_recipe_key(t, p):
    return _recipe(t, p, "plan: {target: {pairs: 3}}\n"), \
        "(ask for fewer or set plan.allow_edge_layers: true)"


# --- 18: --allow-edge-layers suggested only where it would help ---


def case_plan_depth_zero_no_edge_hint(t, p):
    scores = write_scores(p / "scores.json", t["llama"])
    return ["plan", str(scores), "--depth", "0", "-o", str(p / "out")], \
        "--depth 0 needs 6 pairs, but at most 2 non-overlapping pairs fit in a model of 6 layers, first and last " \
        "layers excluded (depth 4 at least) (ask for depth 4 or more)"


def case_plan_pairs_edge_hint_where_it_helps(t, p):
    scores = write_scores(p / "scores.json", t["llama"])
    return ["plan", str(scores), "--pairs", "3", "-o", str(p / "out")], "(ask for fewer or pass --allow-edge-layers)"


# --- 20: recipe keys of a stage that is off ---


def case_recipe_gguf_type_without_gguf(t, p):
    return _recipe(t, p, "export: {gguf_type: q8_0}\n"), \
        "recipe key export.gguf_type applies only with export.format: gguf, and this recipe's export.format is auto"


def case_recipe_distill_keys_with_lsq(t, p):
    return _recipe(t, p, "heal: {method: lsq, steps: 40}\n"), \
        "recipe key heal.steps applies only with heal.method: distill, and this recipe's heal.method is lsq"


# --- item 7: NaN log-likelihoods fail every task's row, LAMBADA or not ---


def case_tasks_gate_with_a_nan_model_without_lambada(t, p):
    import shutil

    from builders import TINY, make_tiny_tokenizer
    from test_errors import _broken_export

    source = p / "source"  # the tiny Llama, with an end-of-sequence token: the harness prefixes with it
    shutil.copytree(t["llama"], source)
    make_tiny_tokenizer(TINY["vocab_size"], eos_token="</s>").save_pretrained(source)
    broken = _broken_export({"llama": source}, p, b"\xff")  # NaN in its first tensor
    return ["eval", str(source), str(broken), "--tasks", "arc_easy,piqa", "--limit", "3", "--device", "cpu",
            "--min-retained", "97%"], "log-likelihoods are NaN or Inf on arc_easy, piqa: a model is broken", \
        Expect(exit_code=1)
