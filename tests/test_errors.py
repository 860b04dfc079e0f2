"""Bad input, case by case through the real CLI: one line naming the problem and the fix, exit code 2,
no traceback, nothing at the output path. docs/errors.md lists the same cases and messages."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
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
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(p / "gpt2")
    return _export(p / "gpt2", p, "--pairs", "1"), "supported: Llama"


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
    from transformers import AutoModelForCausalLM

    folder = p / "sharded"
    AutoModelForCausalLM.from_pretrained(t["llama"]).save_pretrained(folder, max_shard_size="100KB")
    return folder


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


def case_plan_malformed(t, p):
    (p / "plan.json").write_text("[1, 2")
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "not valid JSON"


def case_plan_wrong_schema(t, p):
    (p / "plan.json").write_text(json.dumps({"kind": "lpconvert-plan", "schema_version": 7}))
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "schema_version"


def case_plan_for_another_model(t, p):
    CliRunner().invoke(app, ["export", str(t["qwen2"]), "--pairs", "2", "-o", str(p / "other")])
    shutil.copy(p / "other" / "lpconvert-plan.json", p / "plan.json")
    shutil.rmtree(p / "other")
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "made for another model"


def case_pairs_overlap(t, p):
    return _export(t["llama"], p, "--pairs", "1,2"), "overlap"


def case_pairs_out_of_range(t, p):
    return _export(t["llama"], p, "--pairs", "5"), "out of range"


def case_pair_negative(t, p):
    return _export(t["llama"], p, "--pairs=-1"), "out of range"


def case_plan_pair_not_consecutive(t, p):
    CliRunner().invoke(app, ["export", str(t["llama"]), "--pairs", "2", "-o", str(p / "ok")])
    plan = json.loads((p / "ok" / "lpconvert-plan.json").read_text())
    shutil.rmtree(p / "ok")
    plan["pairs"] = [[2, 4]]
    (p / "plan.json").write_text(json.dumps(plan))
    return _export(t["llama"], p, "--plan", str(p / "plan.json")), "not two consecutive layers"


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


def _scores_for(model, p):
    from test_plan import write_scores

    return write_scores(p / "scores.json", model)


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
    from conftest import TINY, make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": vocab_size})).save_pretrained(p / "other")
    make_tiny_tokenizer(vocab_size).save_pretrained(p / "other")
    return p / "other"


def case_eval_different_vocab_sizes(t, p):
    return ["eval", str(t["llama"]), str(_other_vocabulary(p, 96))], "different vocabulary sizes"


def case_eval_different_tokenizers(t, p):
    from conftest import TINY

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


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tiny_models, tmp_path):
    args, message = CASES[case](tiny_models, tmp_path)
    out_existed = (tmp_path / "out").exists()
    before = (tmp_path / "out").stat().st_mtime_ns if out_existed else None
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.output and "this must never run" not in result.output
    if out_existed:  # untouched
        assert (tmp_path / "out").stat().st_mtime_ns == before
    else:
        assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".lpconvert-tmp-" in p.name]
    assert not leftovers


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
