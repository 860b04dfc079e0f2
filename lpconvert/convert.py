"""Convert: score -> plan -> [heal ->] export -> eval in one command, driven by a YAML recipe.

The recipe names every option of every stage (nothing is hidden); it is copied into the output
folder with the scores, the plan, the heal file and report (when the recipe has a heal: section,
the one optional stage) and the eval report; with `export: {format: gguf}` also model.gguf, the same
model for llama.cpp. The converted model reaches OUT only if it
passes the recipe's gate (or with keep_failed): a CI pipeline can trust the exit code.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import LPError
from .settings import SETTINGS, build, check_engine, check_setting, closest, defaults_of, recipe_label

EXIT_GATE_FAILED = 1
RECIPE_SECTIONS = ("score", "plan", "heal", "export", "eval", "tasks")  # pipeline order; each a settings.py dataclass
OPTIONAL_SECTIONS = ("heal", "tasks")  # stages that run only when their section is in the recipe
HEAL_FILE = "lpconvert-heal.safetensors"
GGUF_FILE = "model.gguf"  # with export.format: gguf, the same model for llama.cpp (ggufexport.py)


class GateFailed(LPError):
    exit_code = EXIT_GATE_FAILED


def _section_defaults() -> dict[str, dict]:
    """Every key a recipe may hold, per section, with its default: the stage's own settings dataclass."""
    return {section: defaults_of(SETTINGS[section]) for section in RECIPE_SECTIONS}


def stage_settings(recipe: dict) -> dict:
    """The recipe's sections as the stages' settings objects (values checked and normalised); an
    optional section the recipe leaves out is None."""
    return {section: build(SETTINGS[section], recipe[section], recipe_label(section)) if section in recipe else None
            for section in RECIPE_SECTIONS}


def load_recipe(path: Path | None) -> dict[str, dict]:
    """The recipe with every section and key filled in, every value checked (settings.py) before any stage
    runs: unknown keys are refused naming the closest, bad values naming the key as written."""
    defaults = _section_defaults()
    raw: dict = {}
    if path is not None:
        raw = _read_recipe(Path(path)) or {}
        if not isinstance(raw, dict):
            raise LPError(f"recipe {path} must be a mapping of sections", "write score:, plan:, export:, eval:")
        _check_size(raw, path)
    recipe = {}
    for section, values in raw.items():
        if section not in defaults:
            raise LPError(f"recipe section '{section}' is unknown ({closest(section, defaults)})",
                          "sections are score, plan, heal, export, eval and tasks")
        if not isinstance(values, dict):
            raise LPError(f"recipe section '{section}' must be a mapping", f"write {section}: followed by keys")
        for key in values:
            if key not in defaults[section]:
                raise LPError(f"recipe key '{section}.{key}' is unknown ({closest(key, defaults[section])})",
                              "remove or rename it")
    for section, keys in defaults.items():
        if section in OPTIONAL_SECTIONS and section not in raw:
            continue
        recipe[section] = {**keys, **(raw.get(section) or {})}
        for key, value in recipe[section].items():
            _check_key(section, key, value)
    _check_across_stages(recipe)
    _check_stages_off(raw, recipe)
    if "tasks" in recipe:
        from .accuracy import check_installed, resolve_tasks

        resolve_tasks(recipe["tasks"]["tasks"], "recipe key tasks.tasks")
        check_installed()
    return recipe


MAX_RECIPE_BYTES = 2**20  # recipes are a page of YAML; anything this large is not one
MAX_RECIPE_VALUES = 10_000  # every number, string, list and mapping, counted with aliases expanded


def _read_recipe(path: Path):
    """The YAML of a recipe file, or one line saying why it can't be one."""
    import yaml

    if path.is_dir():
        raise LPError(f"recipe {path} is a folder", "pass a YAML file, e.g. configs/smollm2-135m.yaml")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise LPError(f"recipe {path} {what}", "pass a YAML file, e.g. configs/smollm2-135m.yaml")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise LPError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB", "pass a recipe YAML file")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LPError(f"recipe {path} is not UTF-8 text (binary, or another encoding such as UTF-16)",
                      "save the recipe as UTF-8 YAML") from None
    except OSError as exc:
        raise LPError(f"cannot read recipe {path}: {exc.strerror or exc}", "pass a readable YAML file") from None
    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506  (a SafeLoader that refuses repeated keys)
    except _RepeatedKey as exc:
        where = f"line {exc.line}" if exc.line == exc.first else f"line {exc.line} (first at line {exc.first})"
        raise LPError(f"recipe {path} repeats the key '{exc.key}' at {where}: "
                      "YAML keeps only the last, so the first is silently dropped",
                      f"keep one '{exc.key}' and merge what both hold into it") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise LPError(f"recipe {path} is not valid YAML{line}", "fix the YAML syntax") from None
    except RecursionError:
        raise LPError(f"recipe {path} is nested too deeply", "write a recipe of sections and keys") from None


class _RepeatedKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


@functools.cache
def _unique_key_loader():
    """yaml.SafeLoader, except that a mapping naming a key twice raises _RepeatedKey (PyYAML keeps the last one
    silently: a second eval: section without the bound would switch a gate off). Merge keys (<<) are YAML's own
    overriding and stay allowed."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _RepeatedKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: construct_mapping refuses it as YAML does
                continue
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def _check_size(raw: dict, path) -> None:
    """Refuse a recipe whose values expand past MAX_RECIPE_VALUES: a YAML alias bomb (nine aliases of nine
    aliases of...) is a few lines that expand to billions of items, and a self-referencing alias never ends.
    Counted with a stack, not recursion, and stopped at the bound."""
    stack, count = [raw], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise LPError(f"recipe {path} holds more than {MAX_RECIPE_VALUES:,} values once its aliases are expanded",
                          "write the recipe's values out: a recipe is a page of keys")
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple)):
            stack += value


def check_runnable_here(recipe: dict) -> None:
    """Texts that don't exist and devices this machine lacks, refused before any stage runs: otherwise eval's
    or heal's would be found only after scoring and planning (hours on a 7B). convert() calls it first; apart
    from load_recipe, which checks a recipe wherever it is read (a GPU recipe is valid on a laptop)."""
    from .runtime import resolve_device
    from .texts import check_text_name

    texts = [("score", "calib"), ("heal", "calib"), ("eval", "text")]
    if _calibrates(recipe["plan"]["use_model"], recipe["plan"]["strategy"]):
        texts.append(("plan", "calib"))
    for section, key in texts:
        if section in recipe:
            check_text_name(recipe[section][key], f"recipe key {section}.{key}")
    for section, values in recipe.items():
        if "device" in values:
            resolve_device(values["device"], f"recipe key {section}.device")
    if recipe["eval"]["engine"] == "vllm":  # vLLM is there (LPCONVERT_VLLM_PYTHON, or this Python), or one line now
        from .vllmengine import vllm_python

        vllm_python()


def _check_key(section: str, key: str, value) -> None:
    # The recipe keeps the value as written ('25%', not 0.25): convert() reads it so today, and the copy
    # of the recipe written to OUT stays the user's. settings.py only decides whether it is valid.
    try:
        check_setting(section, key, value, f"{section}.{key}")
    except LPError as exc:
        raise LPError(f"recipe key {exc.problem}", exc.fix) from None


def _calibrates(use_model: bool, strategy: str | None) -> bool:
    """Whether planning measures the model (search and contiguous can; greedy only ranks the scores)."""
    return bool(use_model) and strategy in (None, "search", "contiguous")


def _check_across_stages(recipe: dict) -> None:
    """Combinations the stages would only refuse after scoring has run (plan.make_plan, build_calibrator)."""
    score, plan, evaluating = recipe["score"], recipe["plan"], recipe["eval"]
    check_engine(evaluating["engine"], evaluating["tensor_parallel"], evaluating["device"], "eval")
    for section, key in (("score", "tokens"), ("score", "loss_tokens"), ("heal", "tokens"),
                         ("heal", "heldout_tokens"), ("eval", "tokens")):
        if section not in recipe:
            continue
        values = recipe[section]
        if key == "loss_tokens" and not (values["measure_loss"] or "loss" in values["metrics"]):
            continue
        if values[key] < values["seq_len"]:
            raise LPError(f"recipe key {section}.{key} {values[key]} is less than one window of {section}.seq_len "
                          f"{values['seq_len']}", f"e.g. {key}: {values['seq_len']} or more")
    if plan["strategy"] == "search" and not plan["use_model"]:
        raise LPError("recipe key plan.strategy search measures the model at every step, but plan.use_model "
                      "is false", "set use_model: true, or strategy: greedy")
    if _calibrates(plan["use_model"], plan["strategy"]) and plan["tokens"] < plan["seq_len"]:
        raise LPError(f"recipe key plan.tokens {plan['tokens']} is less than one window of plan.seq_len "
                      f"{plan['seq_len']}", f"e.g. tokens: {plan['seq_len']} or more")
    if _calibrates(plan["use_model"], plan["strategy"]) and 0 < plan["heldout_tokens"] < plan["seq_len"]:
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
    strategy = plan["strategy"] or ("search" if _calibrates(plan["use_model"], plan["strategy"]) else "greedy")
    if "max_loss_increase" in plan["target"] and not measured and (
            strategy == "greedy" or (strategy == "contiguous" and not _calibrates(plan["use_model"], plan["strategy"]))):
        raise LPError(f"recipe key plan.target.max_loss_increase with strategy {strategy} needs measured "
                      "losses, but score.measure_loss is false",
                      "set measure_loss: true in the score section, or use_model: true with strategy search")


# Keys that apply only where another key switches their stage on: (section, key) -> (the switch, its values that
# switch it on). A key given with a value other than its default, where its stage is off, is refused: it would
# be silently ignored.
ONLY_WHEN = {
    ("export", "gguf_type"): ("format", ("gguf",)),
    ("heal", "train"): ("method", ("distill",)),
    ("heal", "steps"): ("method", ("distill",)),
    ("heal", "lr"): ("method", ("distill",)),
}


def _check_stages_off(raw: dict, recipe: dict) -> None:
    defaults = _section_defaults()
    for (section, key), (switch, on) in ONLY_WHEN.items():
        given = raw.get(section) or {}
        if key not in given or section not in recipe or recipe[section][switch] in on:
            continue
        if _check_key_value(section, key, given[key]) == _check_key_value(section, key, defaults[section][key]):
            continue  # the default, written out (as the recipe copied into OUT writes every key): harmless
        raise LPError(f"recipe key {section}.{key} applies only with {section}.{switch}: {' or '.join(on)}, and this "
                      f"recipe's {section}.{switch} is {recipe[section][switch]}, so it would be ignored",
                      f"set {section}.{switch}: {on[0]}, or remove {section}.{key}")


def _check_key_value(section: str, key: str, value):
    return check_setting(section, key, value, f"{section}.{key}")


def recipe_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def convert(source, out: Path, recipe: dict, *, overwrite: bool = False, keep_failed: bool = False,
            progress: Callable[..., None] | None = None) -> dict:
    """Run the whole pipeline; returns a summary. Raises GateFailed (exit 1) when the gate fails.

    `progress(label, done=None, total=None, unit=..., detail=...)` (a progress.Reporter's `step`)
    hears every stage's own progress, under labels that name the stage.
    """
    from .archs import architecture_for, unpairable_starts
    from .evaluate import evaluate
    from .export import export
    from .healfile import HealFile, write_heal_file
    from .memory import recipe_setter
    from .outputs import atomic_output_dir, check_output_folder, protected_paths, strict_json
    from .plan import pairs_for_target, parse_target, plan_stage
    from .plan.targets import RECIPE
    from .runtime import check_positions
    from .score import compute_scores
    from .sources import resolve_model

    def step(label: str, done=None, total=None, **kwargs) -> None:
        if progress:
            progress(label, done, total, **kwargs)

    protect = protected_paths(source)
    check_output_folder(Path(out), overwrite, protect)
    check_runnable_here(recipe)
    settings = stage_settings(recipe)
    for section in ("score", "plan", "heal", "eval"):  # lengths the model cannot take: refused before any work
        if settings[section] is not None:
            check_positions(source.name, source.config, settings[section].seq_len, f"recipe key {section}.seq_len")
    planned = settings["plan"]
    target = parse_target(**planned.target)
    # Whether the target fits this model, and whether each stage's model fits this machine: config.json
    # settles both, so they are refused now, not after scoring.
    pairs_for_target(target, int(source.config.num_hidden_layers), planned.allow_edge_layers,
                     unpairable_starts(source.config), RECIPE)
    check_memory_up_front(source, settings)
    exporting = settings["export"]
    gguf = exporting.format == "gguf"
    if gguf:  # a model or tokenizer llama.cpp can't take: refused before any work
        from .ggufexport import check_gguf_exportable
        from .ggufvocab import check_vocabulary

        check_gguf_exportable(architecture_for(source.config), source.config)
        check_vocabulary(source)

    scores = compute_scores(source, settings["score"],
                            lambda label, done, total: step(f"score: {label}", done, total),
                            setter=recipe_setter("score"))

    def planning(message: str) -> None:
        step("plan", detail=message)

    planning("choosing pairs")
    plan = plan_stage(scores, target, planned, source if _calibrates(planned.use_model, planned.strategy) else None,
                      progress=planning, wording=RECIPE, setter=recipe_setter("plan"))
    healed = None
    if settings["heal"] is not None and plan.pairs:
        from .heal import heal

        healed = heal(source, plan, settings["heal"], progress=lambda message: step("heal", detail=message),
                      setter=recipe_setter("heal"))
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp:
        staged = tmp / "export"
        heal_file = HealFile(healed.header, healed.tensors, HEAL_FILE) if healed else None
        export(source, plan, staged, dtype=exporting.dtype, max_shard_size=exporting.max_shard_size,
               copy_tokenizer_files=exporting.copy_tokenizer, heal=heal_file,
               progress=lambda done, total: step(f"export: {len(plan.pairs)} pairs", done, total, unit="bytes"))
        if gguf:  # the same plan and heal for llama.cpp, beside the folder transformers loads
            from .ggufexport import export_gguf

            export_gguf(source, plan, staged / GGUF_FILE, gguf_type=exporting.gguf_type, heal=heal_file,
                        progress=lambda done, total: step(f"export: {GGUF_FILE} ({exporting.gguf_type})", done,
                                                          total, unit="bytes"))
        for item in staged.iterdir():
            shutil.move(str(item), tmp / item.name)
        staged.rmdir()
        (tmp / "lpconvert-recipe.yaml").write_text(recipe_yaml(recipe))
        (tmp / "lpconvert-scores.json").write_text(strict_json(scores) + "\n")
        if healed:
            write_heal_file(tmp / HEAL_FILE, healed.tensors, healed.header)
            (tmp / "lpconvert-heal.json").write_text(strict_json(healed.report) + "\n")
        evaluating = "eval: the converted model against the source" + (
            " in vLLM" if settings["eval"].engine == "vllm" else "")
        step(evaluating)
        if settings["eval"].engine == "vllm":  # vLLM's worker reports in words
            def eval_progress(text: str) -> None:
                step(evaluating, detail=text)
        else:
            def eval_progress(done, total) -> None:
                step(evaluating, done, total, unit="batches")
        report = evaluate(source, resolve_model(str(tmp)), settings["eval"], eval_progress,
                          setter=recipe_setter("eval"))
        report["converted"] = str(out)  # not the temporary folder it was evaluated in
        (tmp / "lpconvert-eval.json").write_text(strict_json(report) + "\n")
        failures = list(report["failures"])
        tasks = None
        if settings["tasks"] is not None:
            tasks = _task_accuracy(source, tmp, out, settings["tasks"], step)
            (tmp / "lpconvert-tasks.json").write_text(strict_json(tasks) + "\n")
            failures += tasks["failures"]
        if failures and not keep_failed:
            raise GateFailed(f"the converted model failed the gate: {'; '.join(failures)}",
                             "nothing was written; relax the recipe's eval or tasks bounds, choose fewer pairs, "
                             "or pass --keep-failed to inspect it")
    return {"out": str(out), "pairs": [[p, p + 1] for p in plan.pairs], "effective_depth": plan.effective_depth,
            "plan": plan.to_json(), "heal": healed.report if healed else None, "eval": report, "tasks": tasks,
            "passed": not failures, "failures": failures}


def _task_accuracy(source, staged: Path, out: Path, settings, step) -> dict:
    """The recipe's tasks section: benchmark accuracy of the staged model against the source."""
    from .accuracy import as_steps, task_accuracy
    from .memory import recipe_setter
    from .sources import resolve_model

    return task_accuracy(source, resolve_model(str(staged)), settings, as_steps(step), shown_as=str(out),
                         setter=recipe_setter("tasks"))


def check_memory_up_front(source, settings: dict) -> None:
    """Each stage's model, as the recipe runs it, must fit this machine (memory.py): refused before scoring,
    naming the recipe's keys."""
    from .evaluate import check_eval_memory
    from .heal.stage import check_heal_memory
    from .memory import check_fits, memory_fixes, recipe_setter
    from .plan.load import check_plan_memory
    from .runtime import compute_dtype, dtype_name, resolve_device
    from .score import check_score_memory

    def device(section: str) -> str:
        return resolve_device(settings[section].device, f"recipe key {section}.device")

    check_score_memory(source, settings["score"], device("score"), recipe_setter("score"))
    plan = settings["plan"]
    if _calibrates(plan.use_model, plan.strategy):
        check_plan_memory(source, plan, dtype_name(compute_dtype(plan.dtype, device("plan"))), device("plan"),
                          recipe_setter("plan"))
    if settings["heal"] is not None:
        check_heal_memory(source, settings["heal"], device("heal"), recipe_setter("heal"))
    if settings["eval"].engine == "transformers":  # vLLM sizes its own engines
        check_eval_memory(source, None, settings["eval"], device("eval"), recipe_setter("eval"))
    if settings["tasks"] is not None:
        tasks = settings["tasks"]
        check_fits(source, stage="tasks", dtype=tasks.dtype, device=device("tasks"),
                   fixes=memory_fixes(recipe_setter("tasks"), dtype=tasks.dtype))
