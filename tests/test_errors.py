"""Bad input, case by case through the real CLI: one line naming the problem and the fix, exit code 2,
no traceback, nothing at the output path (nor anywhere else). docs/errors.md lists the same cases and
messages. This is the one table of bad command-line input: the other test modules keep none of their own."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from builders import (
    TINY,
    cli_export,
    corrupt_gguf_tensor,
    export_plan,
    rename_gguf_key,
    save_other_vocabulary,
    save_sharded_safetensors,
    save_tiny_gpt2,
    set_gguf_string,
    write_scores,
)
from typer.testing import CliRunner

from lpconvert.cli import app


def _copy(tiny_models, arch, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_models[arch], folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _export(model, tmp_path, *extra):
    return ["export", str(model), "-o", str(tmp_path / "out"), *extra]


# Each case: a function (tiny_models, tmp_path) -> CLI args, and a substring of the one-line message.
def case_missing_model(t, p):
    return _export(p / "nowhere", p, "--pairs", "2"), "does not exist"


def case_model_is_a_file(t, p):
    (p / "weights.txt").write_text("hello")
    return _export(p / "weights.txt", p, "--pairs", "2"), "weights.txt"


def case_folder_without_config(t, p):
    (p / "empty").mkdir()
    return _export(p / "empty", p, "--pairs", "2"), "config.json"


def case_config_not_json(t, p):
    folder = _copy(t, "llama", p)
    (folder / "config.json").write_text("{not json")
    return _export(folder, p, "--pairs", "2"), "config.json"


def case_config_size_not_a_positive_integer(t, p):
    folder = _copy(t, "llama", p)
    _edit_json(folder / "config.json", num_attention_heads=0)
    return _export(folder, p, "--pairs", "2"), "num_attention_heads is 0, not a positive integer"


def case_config_does_not_match_weights(t, p):
    folder = _copy(t, "llama", p)
    _edit_json(folder / "config.json", hidden_size=None, intermediate_size=None)
    return _export(folder, p, "--pairs", "2"), "does not match the weights"


def case_unsupported_architecture(t, p):
    return _export(save_tiny_gpt2(p / "gpt2"), p, "--pairs", "1"), "supported: Llama (llama), Mistral (mistral)"


def case_quantized_checkpoint(t, p):
    folder = _copy(t, "llama", p)
    _edit_json(folder / "config.json", quantization_config={"quant_method": "gptq", "bits": 4})
    return _export(folder, p, "--pairs", "2"), "quantized (gptq)"


def case_truncated_safetensors(t, p):
    folder = _copy(t, "llama", p)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _export(folder, p, "--pairs", "2"), "truncated"


def case_corrupt_header(t, p):
    folder = _copy(t, "llama", p)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (folder / "model.safetensors").write_bytes(bytes(data))
    return _export(folder, p, "--pairs", "2"), "not a valid safetensors file"


def case_header_length_beyond_file(t, p):
    folder = _copy(t, "llama", p)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    (folder / "model.safetensors").write_bytes(bytes(data))
    return _export(folder, p, "--pairs", "2"), "header length"


def _sharded(t, p):
    return save_sharded_safetensors(t["llama"], p / "sharded")


def case_index_names_missing_tensor(t, p):
    folder = _sharded(t, p)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.extra.weight"] = first_shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return _export(folder, p, "--pairs", "2"), "missing from"


def case_index_path_traversal(t, p):
    folder = _sharded(t, p)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return _export(folder, p, "--pairs", "2"), "outside the model folder"


def case_pickle_needing_more_than_weights(t, p):
    folder = p / "bin"
    folder.mkdir()
    shutil.copy(t["llama"] / "config.json", folder / "config.json")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model.embed_tokens.weight": Evil()}, folder / "pytorch_model.bin")
    return _export(folder, p, "--pairs", "2"), "lpconvert does not run pickled code"


def case_remote_code_without_flag(t, p):
    folder = _copy(t, "llama", p)
    _edit_json(folder / "config.json", auto_map={"AutoConfig": "configuration_x.XConfig"}, model_type="x-custom")
    return _export(folder, p, "--pairs", "2"), "--trust-remote-code"


def case_nan_in_paired_weights(t, p):
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.3.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return _export(folder, p, "--pairs", "2"), "model.layers.3.self_attn.q_proj.weight (layer 3) contains NaN or Inf"


def _plan_file(t, p, pairs):
    """A plan file for the tiny llama (as an export writes it) with its pairs replaced by PAIRS."""
    plan = export_plan(t["llama"], p)
    plan["pairs"] = pairs
    (p / "plan.json").write_text(json.dumps(plan))
    return p / "plan.json"


def case_plan_malformed(t, p):
    (p / "plan.json").write_text("[1, 2")
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "not valid JSON"


def case_plan_wrong_schema(t, p):
    (p / "plan.json").write_text(json.dumps({"kind": "lpconvert-plan", "schema_version": 7}))
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "schema_version"


def case_plan_for_another_model(t, p):
    (p / "plan.json").write_text(json.dumps(export_plan(t["qwen2"], p)))
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "made for another model"


def case_pairs_overlap(t, p):
    return _export(t["llama"], p, "--pairs", "1,2"), "overlap"


def case_pairs_out_of_range(t, p):
    return _export(t["llama"], p, "--pairs", "5"), "out of range"


def case_pair_negative(t, p):
    return _export(t["llama"], p, "--pairs=-1"), "out of range"


def case_plan_pair_not_consecutive(t, p):
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, [[2, 4]]))), "not two consecutive layers"


def case_edge_layer(t, p):
    return _export(t["llama"], p, "--pairs", "4"), "--allow-edge-layers"


def case_output_is_a_file(t, p):
    (p / "out").write_text("a file")
    return _export(t["llama"], p, "--pairs", "2"), "is a file"


def case_output_exists(t, p):
    (p / "out").mkdir()
    return _export(t["llama"], p, "--pairs", "2"), "--overwrite"


def case_output_parent_missing(t, p):
    return ["export", str(t["llama"]), "-o", str(p / "no" / "such" / "out"), "--pairs", "2"], "does not exist"


def case_bad_dtype(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--dtype", "float64"), "--dtype 'float64' does not exist"


def case_calibration_missing(t, p):
    return ["score", str(t["llama"]), "--calib", str(p / "none.txt"), "-o", str(p / "out")], "does not exist"


def case_calibration_empty(t, p):
    (p / "empty.txt").write_text("")
    return ["score", str(t["llama"]), "--calib", str(p / "empty.txt"), "-o", str(p / "out")], "empty"


def case_calibration_binary(t, p):
    (p / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    return ["score", str(t["llama"]), "--calib", str(p / "blob.txt"), "-o", str(p / "out")], "binary"


def case_calibration_too_short(t, p):
    (p / "short.txt").write_text("Only a few words here.")
    return ["score", str(t["llama"]), "--calib", str(p / "short.txt"), "-o", str(p / "out")], "tokens, fewer than"


def case_dataset_offline(t, p):
    return ["score", str(t["llama"]), "--calib", "someone/missing-dataset", "-o", str(p / "out")], "local"


def case_bad_device(t, p):
    return ["score", str(t["llama"]), "--device", "tpu", "-o", str(p / "out")], "--device 'tpu' does not exist"


def _scores_for(model, p, **fields):
    return write_scores(p / "scores.json", model, **fields)


def _plan(scores, p, *args):
    return ["plan", str(scores), *args, "-o", str(p / "out")]


def case_too_many_pairs(t, p):
    return _plan(_scores_for(t["llama"], p), p, "--pairs", "3"), "at most 2 non-overlapping pairs"


def case_scores_malformed(t, p):
    (p / "scores.json").write_text('{"kind": "lpconvert-scores", ')
    return _plan(p / "scores.json", p, "--pairs", "1"), "not valid JSON"


def case_scores_for_another_model(t, p):
    scores = _scores_for(t["qwen2"], p)
    return _plan(scores, p, "--model", str(t["llama"]), "--pairs", "1"), "made for another model"


def _convert(model, p, recipe: str):
    (p / "recipe.yaml").write_text(recipe)
    return ["convert", str(model), "-o", str(p / "out"), "--recipe", str(p / "recipe.yaml")]


def case_recipe_malformed(t, p):
    return _convert(t["llama"], p, "score: [1, 2"), "not valid YAML"


def case_recipe_unknown_key(t, p):
    return _convert(t["llama"], p, "export: {dtyp: bfloat16}"), "did you mean 'dtype'"


def _other_vocabulary(p, vocab_size):
    return save_other_vocabulary(p / "other", vocab_size)


def case_eval_different_vocab_sizes(t, p):
    return ["eval", str(t["llama"]), str(_other_vocabulary(p, 96))], "different vocabulary sizes"


def case_eval_different_tokenizers(t, p):
    other = _other_vocabulary(p, TINY["vocab_size"])
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[-2:]  # same size, two tokens swapped: token ids no longer mean the same text
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    return ["eval", str(t["llama"]), str(other)], "different tokenizers"


def case_tokenizer_corrupt(t, p):
    folder = _copy(t, "llama", p)
    (folder / "tokenizer.json").write_text('{"model": ')
    return _export(folder, p, "--pairs", "2"), "could not load the tokenizer"


# --- cases: model sources and checkpoint reading (sources.py, checkpoint.py readers) ---


def case_model_path_is_a_symlink_loop(t, p):
    (p / "loop").symlink_to("loop")
    return _export(p / "loop", p, "--pairs", "2"), "symlink loop"


def case_model_path_is_a_broken_symlink(t, p):
    (p / "link").symlink_to(p / "gone")
    return _export(p / "link", p, "--pairs", "2"), "broken symlink: its target"


def case_header_shape_disagrees_with_offsets(t, p):
    folder = _copy(t, "llama", p)
    data = bytearray((folder / "model.safetensors").read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].decode()
    edited = header.replace('"shape":[128,', '"shape":[127,', 1)  # same length: the header stays valid
    assert edited != header and len(edited) == len(header)
    data[8:8 + length] = edited.encode()
    (folder / "model.safetensors").write_bytes(bytes(data))
    return _export(folder, p, "--pairs", "2"), "header's shape and data offsets disagree"


def case_gguf_with_garbage_after_the_magic(t, p):
    (p / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage " * 8)
    return _export(p / "x.gguf", p, "--pairs", "2"), "x.gguf is not a readable GGUF file"


# --- cases: text sources (texts.py) ---


def _score_calib(t, p, calib, *extra):
    return ["score", str(t["llama"]), "--calib", str(calib), *extra, "-o", str(p / "out")]


def case_calibration_dev_zero(t, p):  # endless: refused on the first chunk, not read until killed
    return _score_calib(t, p, "/dev/zero"), "looks like a binary file"


def case_calibration_endless_fifo(t, p):
    import os
    import threading

    fifo = p / "endless.txt"
    os.mkfifo(fifo)

    def write_forever():  # daemon: it ends with a broken pipe, or with the test process
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(b"\x00" * 65536)
        except OSError:
            pass

    threading.Thread(target=write_forever, daemon=True).start()
    return _score_calib(t, p, fifo), "looks like a binary file"


def case_calibration_json_too_large(t, p):
    with open(p / "huge.json", "wb") as f:
        f.truncate(300 << 20)  # sparse: refused by its size, never read
    return _score_calib(t, p, p / "huge.json"), "one JSON document of 300.0 MiB, more than the"


def case_tokens_below_one_window(t, p):
    return _score_calib(t, p, "news", "--tokens", "100"), (
        "the token budget (100) is smaller than one window of 512 tokens (--seq-len) "
        "(use --tokens 512 or more, or a smaller --seq-len)"
    )


def case_score_tokens_zero(t, p):
    return _score_calib(t, p, "news", "--tokens", "0"), "--tokens must be a positive integer, got 0"


def case_eval_tokens_zero(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--text", "news", "--tokens", "0"], \
        "--tokens must be a positive integer, got 0 (e.g. --tokens 16384)"


# --- cases: recipes (convert.py) ---


def case_recipe_eval_budget_below_one_window(t, p):
    # refused before any stage runs, not after score, plan and export
    return _convert(t["llama"], p, "eval: {tokens: 32, seq_len: 64}"), \
        "recipe key eval.tokens 32 is less than one window of eval.seq_len 64"


def case_recipe_seq_len_beyond_positions(t, p):
    return _convert(t["llama"], p, "eval: {seq_len: 4096, tokens: 4096}"), \
        "recipe key eval.seq_len is 4096 tokens, beyond the 1024 positions"


def case_config_without_model_type(t, p):
    folder = _copy(t, "llama", p)
    _edit_json(folder / "config.json", model_type=None)
    return _export(folder, p, "--pairs", "2"), "has no model_type"
# A bad value is refused by load_recipe before any stage runs (no scoring pass, no traceback).


def case_recipe_tokens_not_a_number(t, p):
    return _convert(t["llama"], p, "score: {tokens: lots}"), "recipe key score.tokens must be a positive integer"


def case_recipe_depth_text(t, p):
    return _convert(t["llama"], p, 'plan: {target: {depth: "five"}}'), "recipe key plan.target.depth"


def case_recipe_depth_fraction(t, p):
    return _convert(t["llama"], p, "plan: {target: {depth: 5.5}}"), "plan.target.depth must be a positive integer"


def case_recipe_negative_shard_size(t, p):
    return _convert(t["llama"], p, "export: {max_shard_size: -1}"), "recipe key export.max_shard_size"


def case_recipe_boolean_as_text(t, p):
    return _convert(t["llama"], p, 'export: {copy_tokenizer: "no"}'), "export.copy_tokenizer must be true or false"


# --- cases: output paths, gates and settings (cli.py, export.py) ---


def case_output_empty(t, p):
    return ["export", str(t["llama"]), "--pairs", "2", "-o", ""], "is the current folder"


def case_output_under_a_file(t, p):
    (p / "afile").write_text("x")
    return ["export", str(t["llama"]), "--pairs", "2", "-o", str(p / "afile" / "x")], "is a file, not a folder"


def case_output_name_too_long(t, p):
    return ["export", str(t["llama"]), "--pairs", "2", "-o", str(p / ("a" * 300))], "name too long"


def case_output_not_written_by_lpconvert(t, p):
    (p / "out").mkdir()
    (p / "out" / "notes.txt").write_text("mine")
    return _export(t["llama"], p, "--pairs", "2", "--overwrite"), "not written by lpconvert"


def case_max_shard_size_overflows(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--max-shard-size", "1e400GB"), "--max-shard-size must be a size like 5GB, 500MB or 2GiB, got '1e400GB'"


def case_pairs_empty(t, p):
    return _export(t["llama"], p, "--pairs", ""), "--pairs is empty"


def case_integer_weights_without_quantization_config(t, p):
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return _export(folder, p, "--pairs", "2"), f"tensor {name} is stored as int8"


def case_fp8_weights(t, p):
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return _export(folder, p, "--pairs", "2"), "is stored as float8_e4m3fn"


def case_final_norm_missing(t, p):
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return _export(folder, p, "--pairs", "2"), "the checkpoint has no tensor model.norm.weight"


def case_eval_source_with_the_same_shapes_but_other_weights(t, p):
    # a fine-tune or the base model of the same shape: the fingerprint alone (shapes) would pass it
    from builders import make_tiny_model

    other = p / "same-shapes"
    make_tiny_model("llama", seed=7).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(t["llama"] / name, other / name)
    return ["eval", str(other), str(_converted(t, p))], "same shapes, other weights"


def _converted(t, p, arch="llama"):
    return cli_export(t[arch], p / "converted")


def case_eval_unrelated_source(t, p):
    # same vocabulary and tokenizer, another model: the gate would otherwise pass on nonsense
    return ["eval", str(t["qwen2"]), str(_converted(t, p))], "was converted from another model"


def case_eval_arguments_swapped(t, p):
    return ["eval", str(_converted(t, p)), str(t["llama"])], "pass the original model first"


def case_bench_unrelated_baseline(t, p):
    return ["bench", str(_converted(t, p)), "--baseline", str(t["qwen2"]), "--device", "cpu"], \
        "do not come from the same source model"


def case_eval_min_agreement_above_one(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--min-agreement", "2"], "between 0 and 1"


def case_bench_prompt_beyond_positions(t, p):
    return ["bench", str(t["llama"]), "--prompt-len", "2000", "--device", "cpu"], "beyond the 1024 positions"


def case_score_seq_len_beyond_positions(t, p):
    return ["score", str(t["llama"]), "--seq-len", "2048", "-o", str(p / "out")], "beyond the 1024 positions"


def case_score_plot_folder_missing(t, p):
    return ["score", str(t["llama"]), "-o", str(p / "out"), "--plot", str(p / "nowhere" / "s.png")], \
        "does not exist"


def case_plan_pair_reversed(t, p):
    # "[i, i+1]" in the fix must survive Rich markup
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, [[3, 2]]))), "write each pair as [i, i+1]"


def case_plan_pair_as_strings(t, p):
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, [["2", "3"]]))), 'pair ["2", "3"] is not two'


def case_plan_pair_as_booleans(t, p):
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, [[True, 2]]))), "pair [true, 2] is not two"


def case_plan_pair_as_floats(t, p):
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, [[2.0, 3.0]]))), "pair [2.0, 3.0] is not two"


def case_scores_metric_not_a_number(t, p):
    scores = json.loads(_scores_for(t["llama"], p).read_text())
    scores["pairs"][1]["pair_cosine"] = "high"
    (p / "scores.json").write_text(json.dumps(scores))
    return _plan(p / "scores.json", p, "--pairs", "1"), "non-numeric pair_cosine"


def case_plan_heldout_below_one_window(t, p):
    return _plan(_scores_for(t["llama"], p), p, "--pairs", "1", "--model", str(t["llama"]), "--seq-len", "64",
                 "--tokens", "256", "--heldout-tokens", "10"), "--heldout-tokens 10 is less than one window"


def case_score_loss_tokens_below_one_window(t, p):
    return ["score", str(t["llama"]), "--measure-loss", "--loss-tokens", "100", "-o", str(p / "out")], \
        "--loss-tokens 100 is less than one window"


# --- cases: options each command refuses (came from the BAD_EXPORTS table of test_cli.py, BAD_PLANS and the
# scores-file checks of test_plan.py, and the bad-input tests of test_score.py, test_bench.py, test_progress.py)


def case_pairs_and_plan_both_given(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--plan", "x.json"), "exactly one of --plan and --pairs"


def case_pairs_and_plan_both_missing(t, p):
    return _export(t["llama"], p), "exactly one of --plan and --pairs"


def case_pair_far_out_of_range(t, p):
    return _export(t["llama"], p, "--pairs", "9"), "out of range"


def case_edge_layer_first(t, p):
    return _export(t["llama"], p, "--pairs", "0"), "--allow-edge-layers"


def case_pairs_not_numbers(t, p):
    return _export(t["llama"], p, "--pairs", "a,b"), "comma-separated"


def case_dtype_float8(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--dtype", "float8"), "--dtype 'float8' does not exist"


def case_max_shard_size_not_a_size(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--max-shard-size", "big"), "--max-shard-size must be a size like 5GB, 500MB or 2GiB, got 'big'"


def case_plan_missing(t, p):
    return _export(t["llama"], p, "--plan", "nowhere.json"), "does not exist"


def _plan_llama(t, p, *args):
    """`lpconvert plan` of hand-written scores of the tiny llama, with ARGS and -o out."""
    return _plan(_scores_for(t["llama"], p), p, *args)


def case_plan_two_targets(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--depth", "4"), "exactly one target"


def case_plan_no_target(t, p):
    return _plan_llama(t, p), "exactly one target"


def case_plan_depth_too_shallow(t, p):
    return _plan_llama(t, p, "--depth", "2"), "at most 2 non-overlapping pairs"


def case_plan_speedup_out_of_reach(t, p):
    return _plan_llama(t, p, "--speedup", "3"), "at most 2 non-overlapping pairs"


def case_plan_unknown_strategy(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--strategy", "random"), "--strategy 'random' does not exist (use one of contiguous, greedy, search)"


def case_plan_unknown_metric(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--metric", "vibes"), "--metric 'vibes' does not exist (use one of loss_increase, pair_rel_l2, pair_cosine, angular_distance)"


def case_plan_unknown_objective(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--objective", "bleu"), "--objective 'bleu' does not exist (use one of top1, kl, loss, kl_top16, confident_loss, copy_loss, local_loss, miss, copy_miss, top1_copy)"


def case_plan_search_without_model(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--strategy", "search"), "needs --model"


def case_plan_loss_increase_not_a_percentage(t, p):
    return _plan_llama(t, p, "--max-loss-increase", "lots"), "must be a percentage like 5%"


def case_plan_without_output(t, p):
    return ["plan", str(_scores_for(t["llama"], p)), "--pairs", "1"], "give -o plan.json"


def case_plan_beam_zero(t, p):
    return _plan_llama(t, p, "--pairs", "1", "--beam", "0"), "--beam must be a positive integer, got 0"


def case_scores_missing(t, p):
    return _plan(p / "missing.json", p, "--pairs", "1"), "does not exist"


def case_scores_file_is_a_plan(t, p):
    (p / "plan.json").write_text(json.dumps({"kind": "lpconvert-plan"}))
    return _plan(p / "plan.json", p, "--pairs", "1"), "not an lpconvert scores"


def case_scores_without_losses_for_a_loss_target(t, p):
    scores = _scores_for(t["llama"], p, loss=False)
    return _plan(scores, p, "--max-loss-increase", "5%"), "needs measured losses"


def case_score_unknown_metric(t, p):
    return ["score", str(t["llama"]), "-o", str(p / "out"), "--metrics", "bogus"], \
        "--metrics holds 'bogus', which is not one of angular_distance, block_influence, pair_error, loss"


def case_bench_without_model(t, p):
    return ["bench", "--device", "cpu"], "give MODEL or --random-weights"


def case_bench_unknown_shape(t, p):
    return ["bench", "--random-weights", "gpt5", "--device", "cpu"], "unknown shape"


def case_bench_pair_counts_do_not_fit(t, p):
    return ["bench", "--random-weights", "tiny", "--pair-counts", "9", "--device", "cpu"], "do not fit"


def case_bench_batch_size_not_numbers(t, p):
    return ["bench", "--random-weights", "tiny", "--batch-size", "x", "--device", "cpu"], "comma-separated integers"


def case_inspect_missing_model(t, p):
    return ["inspect", str(p / "nope")], "does not exist"


def case_plan_plot_without_measured_losses(t, p):
    scores = json.loads(write_scores(p / "scores.json", t["llama"]).read_text())
    for row in scores["pairs"]:
        row.pop("loss_increase", None)
        row.pop("loss", None)
        row.pop("perplexity", None)
    (p / "scores.json").write_text(json.dumps(scores))
    return ["plan", str(p / "scores.json"), "--pairs", "1", "--metric", "pair_rel_l2", "-o", str(p / "out"),
            "--plot", str(p / "front.png")], "--plot needs measured losses"


def case_scores_file_is_a_device(t, p):
    return ["plan", "/dev/zero", "--pairs", "1", "-o", str(p / "out")], "scores file /dev/zero is not a regular file"


def case_progress_mode_unknown(t, p):
    return ["--progress", "loud", "inspect", str(t["llama"])], "--progress 'loud' does not exist"


def _heal_file(path: Path, model: Path, pairs: list[int], made_for: Path | None = None, fill: float = 0.0) -> Path:
    """A heal file for MODEL's plan of PAIRS (its header naming MADE_FOR's model, if given)."""
    from lpconvert.export import plan_for_pairs
    from lpconvert.healfile import heal_header, tensor_name, write_heal_file
    from lpconvert.sources import resolve_model

    source = resolve_model(str(model))
    plan = plan_for_pairs(source, pairs)
    named = resolve_model(str(made_for or model))
    header = heal_header(source_name=named.name, fingerprint=plan_for_pairs(named, pairs).source, content_sha256=None,
                         plan=plan, method="lsq", settings={}, calibration={}, heldout={}, pairs=[], perplexity={})
    hidden, width = TINY["hidden_size"], 2 * TINY["intermediate_size"]
    write_heal_file(path, {tensor_name(plan, pairs[0], "down_proj"): torch.full((hidden, width), fill)}, header)
    return path


def case_export_heal_file_for_other_pairs(t, p):
    heal = _heal_file(p / "heal.safetensors", t["llama"], [1, 3])
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), "was made for other pairs ((1, 2), (3, 4))"


def case_export_heal_file_for_another_model(t, p):
    heal = _heal_file(p / "heal.safetensors", t["llama"], [2], made_for=t["qwen2"])
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), "was made for another model"


def case_export_heal_file_with_nan(t, p):
    heal = _heal_file(p / "heal.safetensors", t["llama"], [2], fill=float("nan"))
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), "contains NaN or Inf"


def case_export_heal_file_is_a_checkpoint(t, p):
    return (_export(t["llama"], p, "--pairs", "2", "--heal", str(t["llama"] / "model.safetensors")),
            "is not an lpconvert heal file")


def case_export_heal_file_missing(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(p / "nope.safetensors")), "does not exist"


def case_export_heal_file_corrupt(t, p):
    (p / "heal.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    return (_export(t["llama"], p, "--pairs", "2", "--heal", str(p / "heal.safetensors")),
            "is not a readable safetensors file")


def _heal(t, p, *extra, pairs="2"):
    plan = p / "plan.json"
    plan.write_text(json.dumps(export_plan(t["llama"], p, pairs=pairs)))
    return ["heal", str(t["llama"]), "--plan", str(plan), "-o", str(p / "out"), *extra]


def case_heal_output_not_safetensors(t, p):
    return _heal(t, p), "does not end in .safetensors: a heal file is written as NAME.safetensors"


def case_heal_plan_without_pairs(t, p):
    args = _heal(t, p, pairs="none")
    args[args.index("-o") + 1] = str(p / "out.safetensors")
    return args, "the plan has no pairs: there is nothing to heal"


def case_heal_output_inside_the_model_folder(t, p):
    model = _copy(t, "llama", p)
    args = _heal(t, p)
    args[1] = str(model)
    args[args.index("-o") + 1] = str(model / "heal.safetensors")
    return args, "lies inside the source model"


def case_heal_method_unknown(t, p):
    return _heal(t, p, "--method", "sgd"), "--method 'sgd' does not exist"


def case_heal_train_unknown(t, p):
    return _heal(t, p, "--train", "norms"), "--train 'norms' does not exist"


def case_heal_damping_not_numbers(t, p):
    return _heal(t, p, "--damping", "a,b"), "--damping 'a,b' is not a comma-separated list of numbers"


def case_heal_damping_zero(t, p):
    return _heal(t, p, "--damping", "0"), "--damping must be a non-empty list of numbers above 0"


def case_heal_tokens_below_a_window(t, p):
    args = _heal(t, p, "--tokens", "100", "--seq-len", "128")
    args[args.index("-o") + 1] = str(p / "out.safetensors")
    return args, "--tokens 100 is less than one window of --seq-len 128"


def case_recipe_heal_key_unknown(t, p):
    (p / "recipe.yaml").write_text("heal: {damp: 1}\n")
    return ["convert", str(t["llama"]), "-o", str(p / "out"), "--recipe", str(p / "recipe.yaml")], \
        "recipe key 'heal.damp' is unknown (did you mean 'damping'?)"


def _tasks(t, *options):
    return ["eval", str(t["llama"]), str(t["llama"]), *options]


def case_tasks_unknown(t, p):
    return _tasks(t, "--tasks", "hellaswag,arc_esy"), "--tasks: task 'arc_esy' does not exist (did you mean 'arc_easy'?)"


def case_tasks_limit_without_tasks(t, p):
    return _tasks(t, "--limit", "100"), "--limit needs --tasks"


def case_tasks_with_a_text_gate(t, p):
    return _tasks(t, "--tasks", "core", "--max-ppl-increase", "5%"), "--max-ppl-increase does not apply with --tasks"


def case_tasks_limit_zero(t, p):
    return _tasks(t, "--tasks", "core", "--limit", "0"), "--limit must be a positive integer"


def case_tasks_min_retained_not_a_percentage(t, p):
    return _tasks(t, "--tasks", "core", "--min-retained", "most"), "--min-retained must be a percentage"


def case_tasks_tokenizer_without_bos_or_eos(t, p):
    return _tasks(t, "--tasks", "arc_easy", "--limit", "1", "--device", "cpu"), \
        "the tokenizer has neither a beginning- nor an end-of-sequence token"


def case_recipe_tasks_unknown_task(t, p):
    (p / "recipe.yaml").write_text("tasks: {tasks: 'piqa,hellaswg'}\n")
    return ["convert", str(t["llama"]), "-o", str(p / "out"), "--recipe", str(p / "recipe.yaml")], \
        "recipe key tasks.tasks: task 'hellaswg' does not exist"


def _gguf(t, p, arch="llama", *extra):
    return ["export", str(t[arch]), "--pairs", "2", "-o", str(p / "out.gguf"), *extra]


def case_export_gguf_qk_norms(t, p):
    return _gguf(t, p, "qwen3"), "Qwen3 normalises q and k per head, which llama.cpp's deci architecture has no tensors for"


def case_export_gguf_tokenizer_not_byte_level(t, p):
    return _gguf(t, p), "lpconvert writes byte-level BPE tokenizers into a GGUF"


def case_export_gguf_dtype_option(t, p):
    return _gguf(t, p, "llama", "--dtype", "float16"), "--dtype applies to the safetensors format"


def case_export_gguf_type_for_a_folder(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--gguf-type", "q8_0"), "--gguf-type applies to a GGUF export"


def case_export_gguf_type_unknown(t, p):
    return _gguf(t, p, "llama", "--gguf-type", "q4_k"), "--gguf-type"


def case_export_gguf_path_without_suffix(t, p):
    return _export(t["llama"], p, "--pairs", "2", "--format", "gguf"), "does not end in .gguf"


def case_export_gguf_overwrite_of_a_foreign_file(t, p):
    (p / "out.gguf").write_bytes(b"GGUF not ours")
    return _gguf(t, p, "llama", "--overwrite"), "was not written by lpconvert, so --overwrite will not replace it"


def case_recipe_gguf_unknown_type(t, p):
    (p / "recipe.yaml").write_text("export: {format: gguf, gguf_type: q4}\n")
    return ["convert", str(t["llama"]), "-o", str(p / "out"), "--recipe", str(p / "recipe.yaml")], \
        "recipe key export.gguf_type"


# ----------------------------------------------------------------------------------------------
# Issue 23, the reliability round. A case may return a third item, Expect: another exit code (1, a failed
# gate) and the victims, files and folders whose bytes, names and kinds must be exactly as they were.


@dataclass
class Expect:
    exit_code: int = 2
    victims: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # environment variables the command runs with


def _victim_model(t, p) -> Path:
    """Another model's folder, which a heal output must never touch."""
    return _copy(t, "llama", p).rename(p / "victim")


def case_heal_output_in_another_models_folder(t, p):
    victim = _victim_model(t, p)
    args = _heal(t, p)
    args[args.index("-o") + 1] = str(victim / "model.safetensors")
    return args, "is inside the model folder", Expect(victims=[victim])


def case_heal_output_is_a_foreign_file(t, p):
    notes = [p / "notes.safetensors", p / "notes.json"]
    for path in notes:
        path.write_text("the user's notes")
    args = _heal(t, p)
    args[args.index("-o") + 1] = str(notes[0])
    return args, "notes.safetensors already exists (pass --overwrite", Expect(victims=notes)


def case_heal_overwrite_of_a_foreign_file(t, p):
    args, _, expect = case_heal_output_is_a_foreign_file(t, p)
    return [*args, "--overwrite"], "was not written by lpconvert, so --overwrite will not replace it", expect


def case_heal_overwrite_of_a_foreign_report(t, p):
    (p / "notes.json").write_text('{"kind": "my-notes"}')
    args = _heal(t, p, "--overwrite")
    args[args.index("-o") + 1] = str(p / "notes.safetensors")
    return args, "notes.json was not written by lpconvert, so --overwrite will not replace it", Expect(victims=[p / "notes.json"])


def case_heal_output_without_a_name(t, p):
    args = _heal(t, p)
    args[args.index("-o") + 1] = str(p / ".safetensors")
    return args, "has no name before .safetensors: a heal file is written as NAME.safetensors (name the file, e.g. -o "


def case_heal_output_in_proc(t, p):  # root may write anywhere by os.access, and nothing can be created there
    args = _heal(t, p)
    args[args.index("-o") + 1] = "/proc/x.safetensors"
    return args, "cannot create files in /proc"


def _device_node(p) -> Path:
    """A copy of /dev/null made in the test's folder: a character device that an output must not replace."""
    os.mknod(p / "out", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return p / "out"


def case_plan_output_is_a_device(t, p):
    device = _device_node(p)
    return _plan(_scores_for(t["llama"], p), p, "--pairs", "1"), "exists and is not a regular file", \
        Expect(victims=[device])


def case_score_output_is_a_device(t, p):
    device = _device_node(p)
    return ["score", str(t["llama"]), "-o", str(device)], "exists and is not a regular file", Expect(victims=[device])


def _broken_export(t, p, fill: bytes) -> Path:
    """An export whose first tensor's bytes are all FILL: 0xFF is NaN in every float type, 0x7F80 is float32 Inf."""
    out = cli_export(t["llama"], p / "broken", pairs="2")
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    data[8 + length + start:8 + length + end] = (fill * (end - start))[:end - start]
    shard.write_bytes(bytes(data))
    return out


EVAL_QUICK = ["--text", "news", "--split", "all", "--tokens", "256", "--seq-len", "64", "--device", "cpu"]


def case_eval_gate_with_a_nan_model(t, p):
    broken = _broken_export(t, p, b"\xff")
    return ["eval", str(t["llama"]), str(broken), "--max-ppl-increase", "50%", *EVAL_QUICK], \
        "gate failed: perplexity_converted, perplexity_increase, kl_divergence are not finite", Expect(exit_code=1)


def case_eval_gate_with_an_inf_model(t, p):
    broken = _broken_export(t, p, struct.pack("<f", float("inf")))
    return ["eval", str(t["llama"]), str(broken), "--min-agreement", "0", *EVAL_QUICK], "are not finite", \
        Expect(exit_code=1)


def _alias_bomb(depth: int = 9) -> str:
    """A YAML list of nine levels, each level nine aliases of the one before: 9^9 items once expanded."""
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "[" + ", ".join(levels) + "]"


def _recipe(t, p, text: str, data: bytes | None = None):
    path = p / "recipe.yaml"
    path.write_bytes(data if data is not None else text.encode())
    return ["convert", str(t["llama"]), "-o", str(p / "out"), "--recipe", str(path)]


def case_recipe_alias_bomb(t, p):
    return _recipe(t, p, f"score: {{tokens: {_alias_bomb()}}}\n"), \
        "holds more than 10,000 values once its aliases are expanded"


def case_recipe_alias_bomb_nested(t, p):
    return _recipe(t, p, f"heal: {{damping: [0.3, {_alias_bomb()}]}}\n"), "holds more than 10,000 values"


def case_recipe_self_referencing_alias(t, p):
    return _recipe(t, p, "score:\n  tokens: &me [*me]\n"), "holds more than 10,000 values"


def case_recipe_eval_text_missing(t, p):
    return _recipe(t, p, "eval: {text: nowhere.txt}\n"), \
        "recipe key eval.text: text source nowhere.txt does not exist"


def case_recipe_heal_calib_missing(t, p):
    return _recipe(t, p, "heal: {calib: nowhere.txt}\n"), "recipe key heal.calib: text source nowhere.txt"


def _no_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")


def case_recipe_eval_device_without_a_gpu(t, p):
    _no_gpu()
    return _recipe(t, p, "eval: {device: cuda}\n"), "recipe key eval.device cuda was asked but this machine has no CUDA GPU"


def case_recipe_heal_device_without_a_gpu(t, p):
    _no_gpu()
    return _recipe(t, p, "heal: {device: 'cuda:0'}\n"), "recipe key heal.device cuda:0 was asked"


def case_recipe_binary(t, p):
    return _recipe(t, p, "", bytes(range(256))), "is not UTF-8 text"


def case_recipe_utf16(t, p):
    return _recipe(t, p, "", "score: {tokens: 512}\n".encode("utf-16")), "is not UTF-8 text"


def case_recipe_is_a_folder(t, p):
    (p / "recipes").mkdir()
    return ["convert", str(t["llama"]), "-o", str(p / "out"), "--recipe", str(p / "recipes")], "is a folder"


def _heal_header_edited(t, p, **changes) -> Path:
    """A heal file for the tiny llama's pair 2 whose JSON header has CHANGES (a value, or DROP to remove the key)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _heal_file(p / "heal.safetensors", t["llama"], [2])
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["lpconvert_heal"])
    raw = changes.pop("_raw", None)
    for key, value in changes.items():
        target, _, leaf = key.rpartition("__")
        holder = header[target] if target else header
        if value is DROP:
            del holder[leaf]
        else:
            holder[leaf] = value
    save_file(load_file(str(path)), str(path), metadata={"lpconvert_heal": raw or json.dumps(header)})
    return path


DROP = object()
# A heal header field of the wrong type or value, and the words it is refused in.
BAD_HEAL_HEADERS = {
    "plan_is_a_string": ({"plan": "pairs"}, "header field plan must be a mapping whose pairs are [i, i+1] lists"),
    "plan_pair_of_one": ({"plan__pairs": [14]}, "header field plan must be"),
    "source_is_a_string": ({"source": "llama"}, "header field source must be a mapping with name, fingerprint"),
    "pairs_is_a_string": ({"pairs": "abc"}, "header field pairs must be a list of rows"),
    "pairs_of_numbers": ({"pairs": [1, 2]}, "header field pairs must be a list of rows"),
    "pairs_row_of_three_layers": ({"pairs": [{"pair": [14, 15, 16]}]}, "header field pairs must be"),
    "perplexity_is_a_list": ({"heldout_perplexity": [1, 2]}, "header field heldout_perplexity must be"),
    "perplexity_without_tokens": ({"heldout_perplexity": {"unhealed": 20.0, "healed": 19.0}},
                                  "header field heldout_perplexity must be"),
    "perplexity_as_text": ({"heldout_perplexity": {"unhealed": "20", "healed": 19.0, "tokens": 512}},
                           "header field heldout_perplexity must be"),
    "perplexity_infinite": ({"heldout_perplexity": {"unhealed": float("nan"), "healed": float("inf"), "tokens": 512}},
                            "its header is not valid JSON (NaN is not a number JSON allows"),
    "calibration_is_a_string": ({"calibration": "wiki"}, "header field calibration must be a mapping"),
    "settings_is_a_string": ({"settings": "fast"}, "header field settings must be a mapping"),
    "method_is_a_mapping": ({"method": {"a": 1}}, "header field method must be one of lsq, distill, got {'a': 1}"),
    "without_a_source": ({"source": DROP}, "its header has no source"),
}


def _bad_heal_header_case(changes: dict, message: str):
    def case(t, p):
        heal = _heal_header_edited(t, p, **changes)
        return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), message

    return case


for _name, (_changes, _message) in BAD_HEAL_HEADERS.items():
    globals()[f"case_heal_header_{_name}"] = _bad_heal_header_case(_changes, _message)


NESTED = "[" * 100_000 + "]" * 100_000


def case_plan_nested_too_deeply(t, p):
    (p / "plan.json").write_text(NESTED)
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "plan.json is nested too deeply to be one"


def case_plan_object_nested_too_deeply(t, p):
    (p / "plan.json").write_text('{"kind": ' + NESTED + "}")
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "is nested too deeply"


def case_scores_nested_too_deeply(t, p):
    (p / "scores.json").write_text(NESTED)
    return _plan(p / "scores.json", p, "--pairs", "1"), "scores.json is nested too deeply to be one"


def case_heal_header_nested_too_deeply(t, p):
    heal = _heal_header_edited(t, p, _raw=NESTED)
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), "its header is nested too deeply"


def case_plan_pairs_as_a_mapping(t, p):
    return _export(t["llama"], p, "--plan", str(_plan_file(t, p, {"14": 15}))), \
        "lacks valid 'pairs' (a list of [i, i+1])"


def case_tasks_a_set_and_a_misspelt_task(t, p):  # sets and names mix: core,arc_easy is valid
    return _tasks(t, "--tasks", "core,arc_esy"), "task 'arc_esy' does not exist (did you mean 'arc_easy'?)"


def case_tasks_min_retained_without_a_sign(t, p):
    return _tasks(t, "--tasks", "core", "--min-retained", "0.97"), \
        "--min-retained 0.97 has no % sign, so it is ambiguous (write e.g. 97% or 0.97%)"


def case_recipe_min_retained_without_a_sign(t, p):
    return _recipe(t, p, "tasks: {min_retained: 0.97}\n"), \
        "recipe key tasks.min_retained 0.97 has no % sign, so it is ambiguous (write e.g. 97% or 0.97%)"


def case_eval_max_ppl_increase_without_a_sign(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--max-ppl-increase", "10"], \
        "--max-ppl-increase 10 has no % sign, so it is ambiguous (write e.g. 10%)"


def case_heal_steps_not_a_number(t, p):
    return _heal(t, p, "--steps", "abc"), "Invalid value for '--steps'"


def case_heal_lr_not_a_number(t, p):
    return _heal(t, p, "--lr", "abc"), "Invalid value for '--lr'"


def case_tasks_limit_in_exponent_form(t, p):
    return _tasks(t, "--tasks", "core", "--limit", "1e9"), "Invalid value for '--limit'"


def case_tasks_limit_not_a_number(t, p):
    return _tasks(t, "--tasks", "core", "--limit", "abc"), "(see lpconvert eval --help)"


def case_heal_steps_beyond_a_million(t, p):
    return _heal(t, p, "--steps", "99999999999999999999999"), "--steps must be a positive integer up to 1,000,000"


# --- cases: values that overflow the type they are written in (after the inputs' own NaN/Inf checks) ---


def _overflowing_heal_file(p, model: Path, fill: float, dtype: torch.dtype) -> Path:
    """A heal file for MODEL's pair 2 whose down_proj is FILL stored as DTYPE: finite there, as load_heal_file
    checks it, but not in the export's type."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _heal_file(p / "heal.safetensors", model, [2])
    with safe_open(str(path), framework="pt") as f:
        metadata, shapes = f.metadata(), {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    save_file({name: torch.full(shape, fill, dtype=dtype) for name, shape in shapes.items()}, str(path), metadata)
    return path


def case_export_nonfinite_heal_float64_into_float32(t, p):
    heal = _overflowing_heal_file(p, t["llama"], 1e300, torch.float64)
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal)), \
        "model.layers.2.mlp.down_proj.weight holds values beyond float32's range"


def case_export_nonfinite_heal_into_float16(t, p):
    heal = _overflowing_heal_file(p, t["llama"], 1e38, torch.float32)
    return _export(t["llama"], p, "--pairs", "2", "--heal", str(heal), "--dtype", "float16"), \
        "beyond float16's range (65504), the type it is written in (export with --dtype float32 or bfloat16"


def case_export_nonfinite_source_into_float16(t, p):
    # finite in the float32 source, which is all its checks ask; inf once the pair's down_proj is float16
    from safetensors.torch import load_file, save_file

    folder = _copy(t, "llama", p)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = 1e38
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return _export(folder, p, "--pairs", "2", "--dtype", "float16"), \
        "tensor model.layers.2.mlp.down_proj.weight holds values beyond float16's range (65504)"


def _byte_level(p) -> Path:
    from builders import save_byte_level_model

    return save_byte_level_model(p / "byte-level", "llama")


def case_export_nonfinite_heal_into_gguf_f16(t, p):
    model = _byte_level(p)
    heal = _overflowing_heal_file(p, model, 1e38, torch.float32)
    return _gguf({"llama": model}, p, "llama", "--heal", str(heal)), \
        "model.layers.2.mlp.down_proj.weight holds values beyond float16's range (65504)"


def case_export_nonfinite_heal_into_gguf_q8_0(t, p):
    model = _byte_level(p)
    heal = _overflowing_heal_file(p, model, 1e38, torch.float32)
    return _gguf({"llama": model}, p, "llama", "--heal", str(heal), "--gguf-type", "q8_0"), \
        "holds values beyond q8_0's range (127 x 65504: its block scales are float16)"


# --- cases: an lpconvert GGUF whose metadata was edited, run by eval or bench ---


def _exported_gguf(p) -> tuple[Path, Path]:
    """(byte-level source, its GGUF export with pair 2)."""
    model = _byte_level(p)
    return model, cli_export(model, p / "converted.gguf")


def _eval_edited(p, edit) -> list[str]:
    model, gguf = _exported_gguf(p)
    edit(gguf)
    return ["eval", str(model), str(gguf), "--device", "cpu"]


# An edit of a converted GGUF's metadata, and the words eval refuses it in.
GGUF_METADATA_EDITS = {
    "architecture_key_renamed": (lambda g: rename_gguf_key(g, "general.architecture", "general.architecturX"),
                                 "converted.gguf is an lpconvert GGUF whose metadata is damaged: it has no "
                                 "general.architecture entry"),
    "vocab_size_renamed": (lambda g: rename_gguf_key(g, "deci.vocab_size", "deci.vocab_sizX"),
                           "it has no deci.vocab_size entry (re-export it with `lpconvert export SOURCE --plan PLAN -o "
                           "converted.gguf`)"),
    "architecture_decj": (lambda g: set_gguf_string(g, "general.architecture", "decj"),
                          "its general.architecture is 'decj', not 'deci'"),
    "plan_not_an_object": (lambda g: set_gguf_string(g, "lpconvert.plan", "[1, 2]"),
                           "its lpconvert.plan is not a plan (a JSON object with a source)"),
    "plan_not_json": (lambda g: set_gguf_string(g, "lpconvert.plan", "{pairs: [[2, 3]]"), "its lpconvert.plan is not JSON"),
    "plan_nested_deeply": (lambda g: set_gguf_string(g, "lpconvert.plan", "[" * 100_000),
                           "its lpconvert.plan is nested too deeply to be a plan"),
}


def _gguf_metadata_case(edit, message: str):
    def case(t, p):
        return _eval_edited(p, edit), message

    return case


for _name, (_edit, _message) in GGUF_METADATA_EDITS.items():
    globals()[f"case_gguf_metadata_{_name}"] = _gguf_metadata_case(_edit, _message)


def case_gguf_metadata_context_length_renamed(t, p):  # read by bench, before it times anything
    model, gguf = _exported_gguf(p)
    rename_gguf_key(gguf, "deci.context_length", "deci.context_lengtX")
    return ["bench", str(gguf), "--prompt-len", "8", "--new-tokens", "4"], "it has no deci.context_length entry"


def case_eval_gate_with_a_nan_gguf(t, p):  # llama.cpp computes with the NaN weights: perplexity nan
    model, gguf = _exported_gguf(p)
    corrupt_gguf_tensor(gguf)
    return ["eval", str(model), str(gguf), "--max-ppl-increase", "50%", *EVAL_QUICK], "are not finite", \
        Expect(exit_code=1)


# --- cases: --engine vllm, refused before any engine starts ---
# vLLM "found": this very interpreter stands in for vLLM's, with tests/fake_vllm's `vllm` (a version, nothing to run)
# on its path: it passes the check of vLLM's Python, and the refusals come before anything runs in it.
WITH_VLLM = Expect(env={"LPCONVERT_VLLM_PYTHON": sys.executable,
                        "PYTHONPATH": str(Path(__file__).resolve().parent / "fake_vllm")})


def case_vllm_engine_unknown(t, p):
    return ["bench", str(t["llama"]), "--engine", "vlm"], "--engine 'vlm' does not exist"


def case_vllm_tensor_parallel_without_engine(t, p):
    return ["bench", str(t["llama"]), "--tensor-parallel", "2"], "--tensor-parallel needs --engine vllm"


def case_vllm_python_not_an_interpreter(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--engine", "vllm"], "is not a Python interpreter", \
        Expect(env={"LPCONVERT_VLLM_PYTHON": str(p / "no-such-python")})


def case_vllm_with_a_device(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--engine", "vllm", "--device", "cpu"], \
        "vLLM runs where its build runs", WITH_VLLM


def case_vllm_with_tasks(t, p):
    return ["eval", str(t["llama"]), str(t["llama"]), "--engine", "vllm", "--tasks", "core"], \
        "--tasks with --engine vllm is not built yet", WITH_VLLM


def case_vllm_random_weights(t, p):
    return ["bench", "--random-weights", "tiny", "--engine", "vllm"], "vLLM loads folders", WITH_VLLM


def case_vllm_gguf(t, p):
    model, gguf = _exported_gguf(p)
    return ["bench", str(gguf), "--engine", "vllm"], "converted.gguf is a GGUF: --engine vllm runs a model folder", \
        WITH_VLLM


def case_vllm_heads_tensor_parallel_cannot_split(t, p):
    # the tiny Llama has 4 query heads and 2 KV heads per layer, a pair block 8 and 4: 3 devices split none
    return ["eval", str(t["llama"]), str(_converted(t, p)), "--engine", "vllm", "--tensor-parallel", "3"], \
        "block 0 has 4 query and 2 KV heads, which 3 devices cannot share evenly", WITH_VLLM


def case_vllm_sandwich_pairs_tensor_parallel(t, p):
    return ["eval", str(t["gemma3"]), str(_converted(t, p, "gemma3")), "--engine", "vllm", "--tensor-parallel", "2"], \
        "tensor parallelism cannot shard those branch projections", WITH_VLLM


# --- cases: Gemma 3 ---


def case_gemma3_local_global_pair(t, p):  # the tiny Gemma 3's layer 5 is global, 4 local
    return _export(t["gemma3"], p, "--pairs", "4", "--allow-edge-layers"), \
        "pair (4, 5) joins a local (sliding-window) and a global layer"


def case_gemma3_gguf_export(t, p):
    return ["export", str(t["gemma3"]), "--pairs", "2", "-o", str(p / "out.gguf")], \
        "llama.cpp's gemma3 graph cannot"


# Issue 32's cases live in their own modules, one per surface, and join this table here.
from cases_exports import *  # noqa: E402,F403
from cases_gates import *  # noqa: E402,F403
from cases_outputs import *  # noqa: E402,F403
from cases_serving import *  # noqa: E402,F403

CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tiny_models, tmp_path):
    args, message, *rest = CASES[case](tiny_models, tmp_path)
    expect = rest[0] if rest else Expect()
    out = tmp_path / "out"
    out_existed = out.exists()
    before = out.stat().st_mtime_ns if out_existed else None
    out_listing = sorted(os.listdir(out)) if out.is_dir() else None
    listing = sorted(os.listdir(tmp_path))
    victims = snapshot(expect.victims)
    result = CliRunner().invoke(app, args, env=expect.env)
    assert result.exit_code == expect.exit_code, f"exit {result.exit_code}: {result.output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in result.stderr.replace("\n", " "), result.stderr
    assert "Traceback" not in result.output and "this must never run" not in result.output
    if out_existed:  # untouched
        assert out.stat().st_mtime_ns == before
        assert (sorted(os.listdir(out)) if out.is_dir() else None) == out_listing
    else:
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".lpconvert-tmp-" in p.name]
    assert not leftovers
    assert sorted(os.listdir(tmp_path)) == listing  # nothing written anywhere else either
    assert snapshot(expect.victims) == victims  # every byte, name and kind of file as it was


def snapshot(paths: list[Path]) -> dict[str, tuple]:
    """Each file under PATHS: its kind (regular, device...), its device number and the sha256 of its bytes."""
    import hashlib

    found = {}
    for root in paths:
        for path in [root, *(sorted(root.rglob("*")) if root.is_dir() else [])]:
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            found[str(path)] = (stat.S_IFMT(info.st_mode), info.st_rdev, digest)
    return found


def cuda_without_gpu(t, p):
    return ["score", str(t["llama"]), "--device", "cuda", "-o", str(p / "out")], "no CUDA GPU"


def test_cuda_asked_without_a_gpu(tiny_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args, message = cuda_without_gpu(tiny_models, tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr


def raising_writer(exc: BaseException):
    def write(f, data):
        raise exc

    return write


# Faults while an export writes: what the shard writer's byte writes raise instead, the exit code, the message.
FAULTS = {
    "disk_full": (14, OSError(28, "No space left on device"), 2, "disk full"),
    "interrupted": (15, KeyboardInterrupt(), 130, "interrupted"),
}


def fault_export(t, p):
    return _export(t["llama"], p, "--pairs", "2")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_while_writing_cleans_up(fault, tiny_models, tmp_path, monkeypatch):
    import lpconvert.checkpoint as checkpoint

    _, exc, exit_code, message = FAULTS[fault]
    monkeypatch.setattr(checkpoint, "_write_all", raising_writer(exc))
    result = CliRunner().invoke(app, fault_export(tiny_models, tmp_path))
    assert result.exit_code == exit_code and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tiny_models, tmp_path):
    result = CliRunner().invoke(app, ["--debug", *_export(tiny_models["llama"], tmp_path, "--pairs", "1,2")])
    assert result.exit_code != 0 and result.exception is not None
