"""Issue 32's bad-input cases (exports): case_* functions, collected by tests/test_errors.py into its one table.

An export read back by lpconvert (eval, bench, inspect) must be the folder lpconvert wrote: a config.json edited by
hand is refused in one line naming the key (items 5 and 14), and so is a folder whose shipped code or tokenizer is
gone or changed (item 9), before any model is loaded."""

from __future__ import annotations

import torch
from builders import cli_export
from test_errors import EVAL_QUICK, Expect, _copy, _edit_json  # noqa: F401  (test_errors imports this module at its end)


def _edited_export(t, p, arch: str = "llama", pairs: str = "2", **changes):
    """`eval SOURCE EXPORT` of ARCH's export with PAIRS whose config.json has CHANGES (None: the key removed)."""
    export = cli_export(t[arch], p / "export", pairs=pairs)
    _edit_json(export / "config.json", **changes)
    return ["eval", str(t[arch]), str(export), *EVAL_QUICK]


# --- item 5: weights the config no longer describes, which loading would re-initialise or drop ---


def case_export_config_without_lp_projections(t, p):
    return _edited_export(t, p, lp_projections=None), \
        "config.json does not match the weights (lp_projections): the checkpoint has no " \
        "model.layers.0.mlp.gate_up_proj.weight (re-export the model with lpconvert"


def case_export_config_qwen3_head_chunks_changed(t, p):  # the tiny Qwen3's pair heads are in 2 units per half
    return _edited_export(t, p, "qwen3", lp_head_chunks=1), \
        "config.json: lp_head_chunks is 1, but the heads of this model's pairs are stored in 2 units per half"


# --- item 14: hand-edited export configs (once a RuntimeError, ValidationError or ZeroDivisionError) ---


# The per-block widths an older export's config.json declared (per_layer_config; exports no longer write them):
# the tiny Llama's pair (2, 3) is block 2.
OLDER_EXPORT_WIDTHS = {"2": {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 192}}


def case_export_config_blocks_moved(t, p):  # the tiny Llama's export with pair (2, 3): blocks [0] [1] [2, 3] [4] [5]
    return _edited_export(t, p, lp_blocks=[[0], [1, 2], [3], [4], [5]], per_layer_config=OLDER_EXPORT_WIDTHS), \
        'config.json: per_layer_config {"2": [8, 4, 192]} does not match lp_blocks and the one-layer widths, which ' \
        'imply {"1": [8, 4, 192]} (wide blocks as [heads, KV heads, MLP width]); remove per_layer_config to have it ' \
        "derived (re-export the model with lpconvert)"


def case_export_config_blocks_moved_with_their_widths(t, p):  # as exports are now: no per_layer_config
    return _edited_export(t, p, lp_blocks=[[0], [1, 2], [3], [4], [5]]), \
        "config.json does not match the weights (lp_blocks): model.layers.1.self_attn.q_proj.weight is [64, 64] " \
        "in the checkpoint but [128, 64] by the config"


def case_export_config_blocks_empty(t, p):
    return _edited_export(t, p, lp_blocks=[]), \
        "config.json: lp_blocks [] is not a list of blocks, each [i] (a layer) or [i, i+1] (a pair), that hold the " \
        "layers 0, 1, 2, ... in order (re-export the model with lpconvert)"


def case_export_config_blocks_triple(t, p):
    return _edited_export(t, p, lp_blocks=[[0], [1], [2, 3, 4], [5]]), \
        "config.json: lp_blocks [[0], [1], [2, 3, 4], [5]] is not a list of blocks"


def case_export_config_kv_heads(t, p):
    return _edited_export(t, p, num_key_value_heads=3), \
        "config.json: num_key_value_heads 3 does not divide num_attention_heads 4 (re-export the model with lpconvert)"


def case_export_config_kv_heads_with_their_widths(t, p):
    return _edited_export(t, p, num_key_value_heads=1), \
        "config.json does not match the weights (num_key_value_heads): model.layers.0.self_attn.k_proj.weight is " \
        "[32, 64] in the checkpoint but [16, 64] by the config"


def case_export_config_layer_types_too_short(t, p):
    return _edited_export(t, p, layer_types=["full_attention"] * 3), \
        "config.json: layer_types [\"full_attention\", \"full_attention\", \"full_attention\"] is not one of " \
        "full_attention or sliding_attention for each of the 5 blocks of lp_blocks"


def case_export_config_head_chunks_zero(t, p):
    return _edited_export(t, p, "qwen3", lp_head_chunks=0), \
        "config.json: lp_head_chunks is 0, not a positive integer (re-export the model with lpconvert)"


def case_export_config_head_chunks_three(t, p):
    return _edited_export(t, p, "qwen3", lp_head_chunks=3), \
        "config.json: lp_head_chunks 3 does not divide num_key_value_heads 2"


def case_export_config_gemma3_without_sandwich_norms(t, p):
    return _edited_export(t, p, "gemma3", sandwich_norms=False), \
        "config.json does not match the weights (sandwich_norms): the checkpoint holds " \
        "model.layers.0.post_feedforward_layernorm.weight, which the config has no place for"


def case_export_config_sandwich_norms_not_a_boolean(t, p):
    return _edited_export(t, p, "gemma3", sandwich_norms="yes"), \
        "config.json: sandwich_norms is \"yes\", not one of true, false"


def case_export_config_unknown_activation(t, p):  # any other value the model code cannot build: named, not a KeyError
    return _edited_export(t, p, hidden_act="swishy"), \
        "config.json does not build a model: it names an unknown 'swishy' (re-export the model with lpconvert"


# --- item 9: the folder as shipped (eval runs lpconvert's own copy of the code, users run the folder's) ---


def _export_without(t, p, *names: str, edit: str | None = None):
    export = cli_export(t["llama"], p / "export")
    for name in names:
        (export / name).unlink()
    if edit:
        with open(export / edit, "a") as f:
            f.write("\nraise ImportError('broken')\n")
    return ["eval", str(t["llama"]), str(export), *EVAL_QUICK]


def case_export_without_its_modeling_file(t, p):
    return _export_without(t, p, "modeling_lpconvert.py"), \
        "export has no modeling_lpconvert.py: transformers cannot load this export as shipped (re-export the " \
        "model with lpconvert, or put back the files it wrote)"


def case_export_with_an_edited_modeling_file(t, p):
    return _export_without(t, p, edit="modeling_lpconvert.py"), \
        "modeling_lpconvert.py is not the file lpconvert wrote (its sha256 differs from config.json's lp_files)"


def case_export_without_its_tokenizer(t, p):
    return _export_without(t, p, "tokenizer.json", "tokenizer_config.json"), \
        "export has no tokenizer files, though lpconvert wrote tokenizer.json, tokenizer_config.json: users cannot " \
        "load this export as shipped (re-export the model with lpconvert, or put back the files it wrote)"


# --- issue 34: an export is not a source to join again (it converts to GGUF as it is: tests/test_gguf.py) ---


def case_export_of_an_export_to_a_folder(t, p):
    export = cli_export(t["llama"], p / "export", pairs="2")
    return ["export", str(export), "--pairs", "none", "-o", str(p / "again")], \
        "is already an lpconvert export (its blocks are pairs joined as wide layers), not a source to export again " \
        "as a folder (load it as it is with AutoModelForCausalLM or vLLM, or write it for llama.cpp with -o FILE.gguf)"


def case_export_of_an_export_with_pairs(t, p):
    export = cli_export(t["llama"], p / "export", pairs="2")
    return ["export", str(export), "--pairs", "1", "-o", str(p / "again.gguf")], \
        "is an lpconvert export, whose blocks are already joined: --pairs cannot pair them again (its GGUF holds " \
        "them as they are) (leave out --plan and --pairs, or pass --pairs none; to pair other layers, export the " \
        "original model)"


def case_export_of_gemma3_pairs_in_the_stacked_layout(t, p):
    """A Gemma 3 export written before issue 34: its pair's o_proj and down_proj stored [2, out, in]."""
    from safetensors.torch import load_file, save_file

    export = cli_export(t["gemma3"], p / "export", pairs="2")
    tensors = load_file(export / "model.safetensors")
    for name in ("model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        tensors[name] = torch.stack(tensors[name].chunk(2, dim=1)).contiguous()
    save_file(tensors, export / "model.safetensors", metadata={"format": "pt"})
    return ["eval", str(t["gemma3"]), str(export), *EVAL_QUICK], \
        "stores its pairs' model.layers.2.self_attn.o_proj.weight as [2, 64, 64] (the branches stacked), the " \
        "layout lpconvert wrote before 2026-12-06; it now writes [64, 128] (re-export the model with this " \
        "lpconvert; transformers still loads this export with the modeling file it ships)"
