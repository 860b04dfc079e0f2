"""Convert: score -> plan -> export -> eval in one command, driven by a YAML recipe.

The recipe names every option of every stage (nothing is hidden); it is copied into the output
folder with the scores, the plan and the eval report. The converted model reaches OUT only if it
passes the recipe's gate (or with keep_failed): a CI pipeline can trust the exit code.
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .errors import LPError
from .formats import parse_percent
from .plan import DEFAULT_BEAM, DEFAULT_CANDIDATES, DEFAULT_HELDOUT_TOKENS, DEFAULT_TOKENS, DEFAULT_VERIFY

EXIT_GATE_FAILED = 1

# Every key a recipe may hold, per section, with its default.
PLAN_DEFAULTS = {  # the search settings are `lpconvert plan`'s own defaults
    "strategy": None, "metric": None, "target": {"max_loss_increase": "5%"}, "objective": "kl",
    "candidates": DEFAULT_CANDIDATES, "beam": DEFAULT_BEAM, "verify": DEFAULT_VERIFY, "allow_edge_layers": False,
    "calib": "wiki", "tokens": DEFAULT_TOKENS, "heldout_tokens": DEFAULT_HELDOUT_TOKENS, "seq_len": 512, "seed": 0,
    "batch_size": 4, "device": "auto", "dtype": "auto", "use_model": True,
}
EXPORT_DEFAULTS = {"dtype": "auto", "max_shard_size": "5GB", "copy_tokenizer": True}
TARGET_KEYS = ("pairs", "depth", "speedup", "max_loss_increase")


class GateFailed(LPError):
    exit_code = EXIT_GATE_FAILED


def _section_defaults() -> dict[str, dict]:
    from .evaluate import EvalSettings
    from .score import ScoreSettings

    def of(cls):  # tuples become lists, as YAML writes them
        return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(cls)}

    return {"score": of(ScoreSettings), "plan": dict(PLAN_DEFAULTS), "export": dict(EXPORT_DEFAULTS),
            "eval": of(EvalSettings)}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else f"valid: {', '.join(options)}"


def load_recipe(path: Path | None) -> dict[str, dict]:
    """The recipe with every section and key filled in; unknown keys are refused, naming the closest."""
    import yaml

    defaults = _section_defaults()
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LPError(f"recipe {path} does not exist", "pass a YAML file, e.g. configs/smollm2-135m.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise LPError(f"recipe {path} is not valid YAML{line}", "fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise LPError(f"recipe {path} must be a mapping of sections", "write score:, plan:, export:, eval:")
    recipe = {}
    for section, values in raw.items():
        if section not in defaults:
            raise LPError(f"recipe section '{section}' is unknown ({_closest(section, defaults)})",
                          "sections are score, plan, export and eval")
        if not isinstance(values, dict):
            raise LPError(f"recipe section '{section}' must be a mapping", f"write {section}: followed by keys")
        for key in values:
            if key not in defaults[section]:
                raise LPError(f"recipe key '{section}.{key}' is unknown ({_closest(key, defaults[section])})",
                              "remove or rename it")
    for section, keys in defaults.items():
        recipe[section] = {**keys, **(raw.get(section) or {})}
    target = recipe["plan"]["target"]
    if not isinstance(target, dict) or len(target) != 1 or next(iter(target)) not in TARGET_KEYS:
        raise LPError("recipe plan.target must hold exactly one of " + ", ".join(TARGET_KEYS),
                      "e.g. target: {depth: 25}")
    return recipe


def recipe_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def convert(source, out: Path, recipe: dict, *, overwrite: bool = False, keep_failed: bool = False,
            progress: Callable[[str], None] | None = None) -> dict:
    """Run the whole pipeline; returns a summary. Raises GateFailed (exit 1) when the gate fails."""
    from .checkpoint import atomic_output_dir, check_output_path
    from .evaluate import EvalSettings, evaluate
    from .export import export
    from .plan import build_calibrator, make_plan, parse_target
    from .score import ScoreSettings, compute_scores
    from .sources import resolve_model

    def say(text: str) -> None:
        if progress:
            progress(text)

    check_output_path(Path(out), overwrite)
    score_settings = dict(recipe["score"])
    score_settings["metrics"] = tuple(score_settings["metrics"])
    plan_settings, eval_settings = dict(recipe["plan"]), dict(recipe["eval"])
    if isinstance(eval_settings.get("max_ppl_increase"), str):
        eval_settings["max_ppl_increase"] = parse_percent(eval_settings["max_ppl_increase"], "eval.max_ppl_increase")
    ((target_kind, target_value),) = plan_settings["target"].items()
    target = parse_target(**{target_kind: target_value})

    say("scoring layers and pairs")
    scores = compute_scores(source, ScoreSettings(**score_settings))
    calibrator = None
    strategy = plan_settings["strategy"]
    if plan_settings["use_model"] and strategy in (None, "search", "contiguous"):
        say("loading calibration text for planning")
        calibrator = build_calibrator(source, calib=plan_settings["calib"], tokens=plan_settings["tokens"],
                                      seq_len=plan_settings["seq_len"], seed=plan_settings["seed"],
                                      heldout_tokens=plan_settings["heldout_tokens"],
                                      objective=plan_settings["objective"], batch_size=plan_settings["batch_size"],
                                      device=plan_settings["device"], dtype=plan_settings["dtype"])
    say("planning")
    plan = make_plan(scores, target=target, strategy=strategy, metric=plan_settings["metric"], calibrator=calibrator,
                     allow_edge_layers=plan_settings["allow_edge_layers"], candidates=plan_settings["candidates"],
                     beam=plan_settings["beam"], verify=plan_settings["verify"])
    del calibrator
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        say(f"exporting {len(plan.pairs)} pairs")
        staged = tmp / "export"
        settings = recipe["export"]
        export(source, plan, staged, dtype=settings["dtype"], max_shard_size=settings["max_shard_size"],
               copy_tokenizer_files=settings["copy_tokenizer"])
        for item in staged.iterdir():
            shutil.move(str(item), tmp / item.name)
        staged.rmdir()
        (tmp / "lpconvert-recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "lpconvert-scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        say("evaluating the converted model against the source")
        report = evaluate(source, resolve_model(str(tmp)), EvalSettings(**eval_settings))
        report["converted"] = str(out)  # not the temporary folder it was evaluated in
        (tmp / "lpconvert-eval.json").write_text(json.dumps(report, indent=2) + "\n")
        if not report["passed"] and not keep_failed:
            raise GateFailed(f"the converted model failed the gate: {'; '.join(report['failures'])}",
                             "nothing was written; relax the recipe's eval bounds, choose fewer pairs, "
                             "or pass --keep-failed to inspect it")
    return {"out": str(out), "pairs": [[p, p + 1] for p in plan.pairs], "effective_depth": plan.effective_depth,
            "plan": plan.to_json(), "eval": report, "passed": report["passed"]}
