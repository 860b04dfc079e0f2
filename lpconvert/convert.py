"""Convert: score -> plan -> export -> eval in one command, driven by a YAML recipe.

The recipe names every option of every stage (nothing is hidden); it is copied into the output
folder with the scores, the plan and the eval report. The converted model reaches OUT only if it
passes the recipe's gate (or with keep_failed): a CI pipeline can trust the exit code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .errors import LPError
from .formats import parse_percent
from .plan import DEFAULT_BEAM, DEFAULT_CANDIDATES, DEFAULT_HELDOUT_TOKENS, DEFAULT_TOKENS, DEFAULT_VERIFY
from .settings import TARGETS, check_setting, closest

EXIT_GATE_FAILED = 1

# Every key a recipe may hold, per section, with its default.
PLAN_DEFAULTS = {  # the search settings are `lpconvert plan`'s own defaults
    "strategy": None, "metric": None, "target": {"max_loss_increase": "5%"}, "objective": "kl",
    "candidates": DEFAULT_CANDIDATES, "beam": DEFAULT_BEAM, "verify": DEFAULT_VERIFY, "allow_edge_layers": False,
    "calib": "wiki", "tokens": DEFAULT_TOKENS, "heldout_tokens": DEFAULT_HELDOUT_TOKENS, "seq_len": 512, "seed": 0,
    "batch_size": 4, "device": "auto", "dtype": "auto", "use_model": True,
}
EXPORT_DEFAULTS = {"dtype": "auto", "max_shard_size": "5GB", "copy_tokenizer": True}
TARGET_KEYS = tuple(TARGETS)  # pairs, depth, speedup, max_loss_increase


class GateFailed(LPError):
    exit_code = EXIT_GATE_FAILED


def _section_defaults() -> dict[str, dict]:
    from .evaluate import EvalSettings
    from .score import ScoreSettings

    def of(cls):  # tuples become lists, as YAML writes them
        return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(cls)}

    return {"score": of(ScoreSettings), "plan": dict(PLAN_DEFAULTS), "export": dict(EXPORT_DEFAULTS),
            "eval": of(EvalSettings)}


def load_recipe(path: Path | None) -> dict[str, dict]:
    """The recipe with every section and key filled in, every value checked (settings.py) before any stage
    runs: unknown keys are refused naming the closest, bad values naming the key as written."""
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
            raise LPError(f"recipe section '{section}' is unknown ({closest(section, defaults)})",
                          "sections are score, plan, export and eval")
        if not isinstance(values, dict):
            raise LPError(f"recipe section '{section}' must be a mapping", f"write {section}: followed by keys")
        for key in values:
            if key not in defaults[section]:
                raise LPError(f"recipe key '{section}.{key}' is unknown ({closest(key, defaults[section])})",
                              "remove or rename it")
    for section, keys in defaults.items():
        recipe[section] = {**keys, **(raw.get(section) or {})}
        for key, value in recipe[section].items():
            _check_key(section, key, value)
    _check_across_stages(recipe)
    return recipe


def _check_key(section: str, key: str, value) -> None:
    # The recipe keeps the value as written ('25%', not 0.25): convert() reads it so today, and the copy
    # of the recipe written to OUT stays the user's. settings.py only decides whether it is valid.
    try:
        check_setting(section, key, value, f"{section}.{key}")
    except LPError as exc:
        raise LPError(f"recipe key {exc.problem}", exc.fix) from None


def _calibrates(plan: dict) -> bool:
    """Whether convert() measures the model while planning (as its body decides)."""
    return bool(plan["use_model"]) and plan["strategy"] in (None, "search", "contiguous")


def _check_across_stages(recipe: dict) -> None:
    """Combinations the stages would only refuse after scoring has run (plan.make_plan, build_calibrator)."""
    score, plan = recipe["score"], recipe["plan"]
    if plan["strategy"] == "search" and not plan["use_model"]:
        raise LPError("recipe key plan.strategy search measures the model at every step, but plan.use_model "
                      "is false", "set use_model: true, or strategy: greedy")
    if _calibrates(plan) and plan["tokens"] < plan["seq_len"]:
        raise LPError(f"recipe key plan.tokens {plan['tokens']} is less than one window of plan.seq_len "
                      f"{plan['seq_len']}", f"e.g. tokens: {plan['seq_len']} or more")
    if _calibrates(plan) and 0 < plan["heldout_tokens"] < plan["seq_len"]:
        raise LPError(f"recipe key plan.heldout_tokens {plan['heldout_tokens']} is less than one window of "
                      f"plan.seq_len {plan['seq_len']}",
                      f"e.g. heldout_tokens: {plan['seq_len']} or more, or 0 to switch the held-out check off")
    measured = score["measure_loss"] or "loss" in score["metrics"]  # scores then hold loss_increase
    needs = {"pair_rel_l2": "pair_error" in score["metrics"], "pair_cosine": "pair_error" in score["metrics"],
             "loss_increase": measured}
    if not needs.get(plan["metric"], True):
        wanted = "loss_increase needs score.measure_loss: true" if plan["metric"] == "loss_increase" \
            else f"{plan['metric']} needs pair_error in score.metrics"
        raise LPError(f"recipe key plan.metric {wanted}",
                      "add it to the score section or choose another metric")
    strategy = plan["strategy"] or ("search" if _calibrates(plan) else "greedy")
    if "max_loss_increase" in plan["target"] and not measured and (
            strategy == "greedy" or (strategy == "contiguous" and not _calibrates(plan))):
        raise LPError(f"recipe key plan.target.max_loss_increase with strategy {strategy} needs measured "
                      "losses, but score.measure_loss is false",
                      "set measure_loss: true in the score section, or use_model: true with strategy search")


def recipe_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def convert(source, out: Path, recipe: dict, *, overwrite: bool = False, keep_failed: bool = False,
            progress: Callable[..., None] | None = None) -> dict:
    """Run the whole pipeline; returns a summary. Raises GateFailed (exit 1) when the gate fails.

    `progress(label, done=None, total=None, unit=..., detail=...)` (a progress.Reporter's `step`)
    hears every stage's own progress, under labels that name the stage.
    """
    from .evaluate import EvalSettings, evaluate
    from .export import export
    from .outputs import atomic_output_dir, check_output_folder, protected_paths
    from .plan import build_calibrator, make_plan, parse_target
    from .score import ScoreSettings, compute_scores
    from .sources import resolve_model

    def step(label: str, done=None, total=None, **kwargs) -> None:
        if progress:
            progress(label, done, total, **kwargs)

    protect = protected_paths(source)
    check_output_folder(Path(out), overwrite, protect)
    score_settings = dict(recipe["score"])
    score_settings["metrics"] = tuple(score_settings["metrics"])
    plan_settings, eval_settings = dict(recipe["plan"]), dict(recipe["eval"])
    if isinstance(eval_settings.get("max_ppl_increase"), str):
        eval_settings["max_ppl_increase"] = parse_percent(eval_settings["max_ppl_increase"], "eval.max_ppl_increase")
    ((target_kind, target_value),) = plan_settings["target"].items()
    target = parse_target(**{target_kind: target_value})

    scores = compute_scores(source, ScoreSettings(**score_settings),
                            lambda label, done, total: step(f"score: {label.lower()}", done, total))
    calibrator = None
    strategy = plan_settings["strategy"]

    def planning(message: str) -> None:
        step("plan", detail=message)

    if plan_settings["use_model"] and strategy in (None, "search", "contiguous"):
        calibrator = build_calibrator(source, calib=plan_settings["calib"], tokens=plan_settings["tokens"],
                                      seq_len=plan_settings["seq_len"], seed=plan_settings["seed"],
                                      heldout_tokens=plan_settings["heldout_tokens"],
                                      objective=plan_settings["objective"], batch_size=plan_settings["batch_size"],
                                      device=plan_settings["device"], dtype=plan_settings["dtype"], progress=planning)
    planning("choosing pairs")
    plan = make_plan(scores, target=target, strategy=strategy, metric=plan_settings["metric"], calibrator=calibrator,
                     allow_edge_layers=plan_settings["allow_edge_layers"], candidates=plan_settings["candidates"],
                     beam=plan_settings["beam"], verify=plan_settings["verify"], progress=planning)
    del calibrator
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp:
        staged = tmp / "export"
        settings = recipe["export"]
        export(source, plan, staged, dtype=settings["dtype"], max_shard_size=settings["max_shard_size"],
               copy_tokenizer_files=settings["copy_tokenizer"],
               progress=lambda done, total: step(f"export: {len(plan.pairs)} pairs", done, total, unit="bytes"))
        for item in staged.iterdir():
            shutil.move(str(item), tmp / item.name)
        staged.rmdir()
        (tmp / "lpconvert-recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "lpconvert-scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        step("eval: the converted model against the source")
        report = evaluate(source, resolve_model(str(tmp)), EvalSettings(**eval_settings),
                          lambda done, total: step("eval: the converted model against the source", done, total,
                                                   unit="batches"))
        report["converted"] = str(out)  # not the temporary folder it was evaluated in
        (tmp / "lpconvert-eval.json").write_text(json.dumps(report, indent=2) + "\n")
        if not report["passed"] and not keep_failed:
            raise GateFailed(f"the converted model failed the gate: {'; '.join(report['failures'])}",
                             "nothing was written; relax the recipe's eval bounds, choose fewer pairs, "
                             "or pass --keep-failed to inspect it")
    return {"out": str(out), "pairs": [[p, p + 1] for p in plan.pairs], "effective_depth": plan.effective_depth,
            "plan": plan.to_json(), "eval": report, "passed": report["passed"]}
