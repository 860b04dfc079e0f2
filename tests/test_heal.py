"""The heal stage: corrections that lower the calibration objective, a heal file that export applies
exactly as the heal stage measured it, and refusals of heal files made for something else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import TINY_ARCHS, invoke
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lpconvert.export import export, plan_for_pairs
from lpconvert.heal import heal
from lpconvert.healfile import HEALED_PARTS, heal_header, load_heal_file, tensor_name, write_heal_file
from lpconvert.runner import LayerRunner
from lpconvert.settings import HealSettings, build
from lpconvert.sources import resolve_model

PAIRS = [1, 3]
QUICK = {"tokens": 1024, "heldout_tokens": 256, "seq_len": 64, "damping": [0.1, 1.0], "device": "cpu"}
QUICK_OPTIONS = ["--tokens", "1024", "--heldout-tokens", "256", "--seq-len", "64", "--damping", "0.1,1",
                 "--device", "cpu"]


def _ids(batch=2, seq=24, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _healed(tiny_dir: Path, pairs=PAIRS, **settings):
    source = resolve_model(str(tiny_dir))
    plan = plan_for_pairs(source, pairs)
    return source, plan, heal(source, plan, build(HealSettings, {**QUICK, **settings}))


@pytest.fixture(scope="module")
def healed(tiny_models):
    """Each tiny architecture healed (lsq) once per module."""
    return {arch: _healed(tiny_models[arch]) for arch in TINY_ARCHS}


def _runner_logits(model, ids, corrections) -> torch.Tensor:
    runner = LayerRunner(model, seq_len=ids.shape[1])
    runner.corrections = corrections
    with torch.no_grad():
        return runner._head(runner.run(runner.embed(ids), pairs=PAIRS))


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_lsq_lowers_the_calibration_objective(arch, healed):
    _, _, result = healed[arch]
    rows = result.report["pairs"]
    assert [row["pair"] for row in rows] == [[p, p + 1] for p in PAIRS]
    for row in rows:
        assert row["calib_residual_after"] < row["calib_residual_before"]
        # a kept correction lowered the held-out loss; a rejected one left the pair as it was
        if row["accepted"]:
            assert row["heldout_loss_after"] < row["heldout_loss_before"]
        else:
            assert row["heldout_loss_after"] == row["heldout_loss_before"]
    kept = {p for p in PAIRS if rows[PAIRS.index(p)]["accepted"]}
    assert set(result.corrections) == kept
    assert result.report["heldout_perplexity"]["healed"] <= result.report["heldout_perplexity"]["unhealed"]


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_healed_export_equals_the_model_heal_measured(arch, healed, tmp_path):
    source, plan, result = healed[arch]
    model = source.load_model()
    runner = LayerRunner(model, seq_len=8)
    # The heal stage's own corrections where it kept some, and every other fused projection of every
    # pair perturbed (distill's input projections with the norms folded in too), so each
    # architecture's replacement path is exercised whatever was kept.
    corrections = {p: dict(fitted) for p, fitted in result.corrections.items()}
    generator = torch.Generator().manual_seed(1)
    for pair in PAIRS:
        for name in HEALED_PARTS:
            if name not in corrections.get(pair, {}):
                weight, _ = runner.projection(pair, name)
                noise = 0.05 * torch.randn(weight.shape, generator=generator)
                corrections.setdefault(pair, {})[name] = (weight + noise).float()
    tensors = {tensor_name(plan, p, name): w for p, fitted in corrections.items() for name, w in fitted.items()}
    write_heal_file(tmp_path / "heal.safetensors", tensors, result.header)
    export(source, plan, tmp_path / "out", dtype="float32", heal=load_heal_file(tmp_path / "heal.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = _ids()
    with torch.no_grad():
        got = exported(ids).logits
    expected = _runner_logits(model, ids, corrections)
    unhealed = _runner_logits(model, ids, {})
    assert not torch.allclose(expected, unhealed, atol=1e-3)  # the corrections matter
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert sorted(config["lp_heal"]["tensors"]) == sorted(tensors)
    assert "Healed (lsq" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_heal_that_changes_nothing_is_bit_identical(dtype, tiny_models, tmp_path):
    source = resolve_model(str(tiny_models["qwen2"]))
    plan = plan_for_pairs(source, PAIRS)
    runner = LayerRunner(source.load_model(), seq_len=8)
    tensors = {tensor_name(plan, p, name): runner.projection(p, name)[0] for p in PAIRS for name in HEALED_PARTS}
    header = heal_header(source_name=source.name, fingerprint=plan.source, content_sha256=None, plan=plan,
                         method="lsq", settings={}, calibration={}, heldout={}, pairs=[], perplexity={})
    write_heal_file(tmp_path / "same.safetensors", tensors, header)
    export(source, plan, tmp_path / "plain", dtype=dtype)
    export(source, plan, tmp_path / "healed", dtype=dtype, heal=load_heal_file(tmp_path / "same.safetensors"))
    plain, healed_bytes = _shards(tmp_path / "plain"), _shards(tmp_path / "healed")
    assert plain.keys() == healed_bytes.keys()
    for name in plain:  # the tensors' bytes; the header differs only if a tensor did
        assert plain[name] == healed_bytes[name]


def test_cli_heal_then_export(tiny_models, tmp_path):
    model = tiny_models["llama"]
    plan = tmp_path / "plan.json"
    assert invoke("export", model, "--pairs", "1,3", "-o", tmp_path / "plain").exit_code == 0
    plan.write_text((tmp_path / "plain" / "lpconvert-plan.json").read_text())
    result = invoke("heal", model, "--plan", plan, "-o", tmp_path / "heal.safetensors", *QUICK_OPTIONS,
                    "--plot", tmp_path / "heal.png")
    assert result.exit_code == 0, result.output
    assert "Heal (lsq" in result.stdout and "held-out ppl" in result.stdout
    report = json.loads((tmp_path / "heal.json").read_text())
    assert report["kind"] == "lpconvert-heal" and len(report["pairs"]) == 2
    assert report["peak_memory_bytes"] > 0 and report["seconds"] > 0
    assert (tmp_path / "heal.png").stat().st_size > 1000
    with safe_open(tmp_path / "heal.safetensors", "pt") as f:
        assert sorted(f.keys()) == report["tensors"]
        assert json.loads(f.metadata()["lpconvert_heal"])["plan"]["pairs"] == [[1, 2], [3, 4]]
    result = invoke("export", model, "--plan", plan, "--heal", tmp_path / "heal.safetensors", "-o", tmp_path / "out",
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["healed"] == report["tensors"]
    as_json = invoke("heal", model, "--plan", plan, "-o", tmp_path / "again.safetensors", *QUICK_OPTIONS, "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["tensors"] == report["tensors"]  # deterministic


@pytest.mark.parametrize("train", ["all", "output"])
def test_distill_keeps_the_best_held_out_weights(train, tiny_models, tmp_path):
    source, plan, result = _healed(tiny_models["llama"], method="distill", steps=6, lr=1e-3, train=train)
    distill = result.report["distill"]
    trace = [t["heldout_loss"] for t in distill["trace"]]
    assert [t["step"] for t in distill["trace"]] == [0, 6]
    assert distill["heldout_loss_after"] == pytest.approx(min(trace), abs=1e-6)
    assert distill["heldout_loss_after"] <= distill["heldout_loss_before"]
    trained = {"all": set(HEALED_PARTS), "output": {"o_proj", "down_proj"}}[train]
    assert set(distill["train"]) == trained
    if train == "all":  # on this model 6 steps of every projection lower the held-out loss (output alone does not)
        assert distill["heldout_loss_after"] < distill["heldout_loss_before"]
    if distill["heldout_loss_after"] < distill["heldout_loss_before"]:  # it changed the weights: only those trained
        assert {name for fitted in result.corrections.values() for name in fitted} <= trained | {"down_proj"}
        assert {n.rsplit(".", 2)[-2] for n in result.tensors} == trained
        # the healed export computes what distill measured on the held-out windows
        write_heal_file(tmp_path / "heal.safetensors", result.tensors, result.header)
        export(source, plan, tmp_path / "out", dtype="float32", heal=load_heal_file(tmp_path / "heal.safetensors"))
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        ids = _ids()
        with torch.no_grad():
            got = exported(ids).logits
        torch.testing.assert_close(got, _runner_logits(source.load_model(), ids, result.corrections),
                                   atol=2e-5, rtol=1e-4)
        card = (tmp_path / "out" / "README.md").read_text()
        assert "Healed (distill" in card and ("projections" if train == "all" else "o_proj and down_proj") in card


def test_healed_export_loads_without_lpconvert(healed, tmp_path):
    source, plan, result = healed["llama"]
    write_heal_file(tmp_path / "heal.safetensors", result.tensors, result.header)
    export(source, plan, tmp_path / "out", heal=load_heal_file(tmp_path / "heal.safetensors"))
    script = f"""
import sys
sys.modules["lpconvert"] = None  # any import of lpconvert now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True)
assert "lp_heal" in model.config.to_dict()
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
assert out.shape == (1, 7)
print("standalone ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "standalone ok" in done.stdout


def test_convert_recipe_with_a_heal_section(tiny_models, tmp_path):
    from builders import QUICK_RECIPE

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK_RECIPE + "heal: {tokens: 1024, heldout_tokens: 256, seq_len: 64, damping: [1.0], "
                                     "device: cpu}\n")
    result = invoke("convert", tiny_models["llama"], "-o", tmp_path / "out", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["heal"]["method"] == "lsq" and len(summary["heal"]["pairs"]) == 1
    out = tmp_path / "out"
    assert (out / "lpconvert-heal.safetensors").is_file() and (out / "lpconvert-heal.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["lp_heal"]["tensors"] == summary["heal"]["tensors"]
    written = (out / "lpconvert-recipe.yaml").read_text()
    assert "heal:" in written
    again = invoke("convert", tiny_models["llama"], "-o", out, "--recipe", recipe, "--overwrite")
    assert again.exit_code == 0, again.output  # a convert output with a heal file is lpconvert's to replace


def test_recipe_without_heal_section_does_not_heal(tiny_models, tmp_path):
    from builders import QUICK_RECIPE

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICK_RECIPE)
    result = invoke("convert", tiny_models["llama"], "-o", tmp_path / "out", "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["heal"] is None
    assert "heal:" not in (tmp_path / "out" / "lpconvert-recipe.yaml").read_text()
    assert "lp_heal" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_global_target_fits_toward_the_source_stream(tiny_models):
    _, _, result = _healed(tiny_models["mistral"], target="global")
    assert result.header["settings"]["target"] == "global"
    for row in result.report["pairs"]:
        assert row["calib_residual_after"] < row["calib_residual_before"]
    assert result.report["heldout_perplexity"]["healed"] <= result.report["heldout_perplexity"]["unhealed"]


def test_heal_replaces_only_its_own_files_and_only_with_overwrite(tiny_models, tmp_path):
    model = tiny_models["llama"]
    plan = tmp_path / "plan.json"
    assert invoke("export", model, "--pairs", "1", "-o", tmp_path / "plain").exit_code == 0
    plan.write_text((tmp_path / "plain" / "lpconvert-plan.json").read_text())
    args = ["heal", model, "--plan", plan, "-o", tmp_path / "heal.safetensors", *QUICK_OPTIONS]
    assert invoke(*args).exit_code == 0
    first = (tmp_path / "heal.safetensors").read_bytes(), (tmp_path / "heal.json").read_text()
    again = invoke(*args)
    assert again.exit_code == 2 and "already exists (pass --overwrite" in again.stderr
    assert ((tmp_path / "heal.safetensors").read_bytes(), (tmp_path / "heal.json").read_text()) == first
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((tmp_path / "heal.json").read_text())["kind"] == "lpconvert-heal"


def test_sigterm_during_heal_exits_130_and_leaves_nothing(tiny_models, tmp_path):
    """A CI timeout sends SIGTERM: the heal stops with exit 130 and one line, and writes neither file. The signal is
    sent once heal reports its work has started (no timing), with enough steps that it cannot finish first."""
    import signal
    import subprocess
    import sys

    plan = tmp_path / "plan.json"
    assert invoke("export", tiny_models["llama"], "--pairs", "1", "-o", tmp_path / "plain").exit_code == 0
    plan.write_text((tmp_path / "plain" / "lpconvert-plan.json").read_text())
    command = [sys.executable, "-m", "lpconvert", "--progress", "lines", "heal", str(tiny_models["llama"]), "--plan",
               str(plan), "-o", str(tmp_path / "heal.safetensors"), *map(str, QUICK_OPTIONS), "--method", "distill",
               "--steps", "1000000"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:  # wait for the heal's own progress, however long loading takes
        lines.append(line)
        if "healing" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert rest.strip().splitlines()[-1] == "interrupted: nothing was written at the output path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "plan.json"]
