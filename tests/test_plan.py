"""The plan stage: targets, strategies, measuring pair sets, the plan file and the command line.

Scores files are written by hand here (builders.write_scores; the score stage is tested on its own),
with the fingerprint of the tiny model they claim to describe. Bad plan input is in test_errors.CASES.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import invoke, write_scores

from lpconvert.errors import LPError
from lpconvert.formats import load_plan, validate_pairs
from lpconvert.plan import (
    ALPHA,
    Calibrator,
    Target,
    contiguous_runs,
    estimated_speedup,
    make_plan,
    max_pairs,
    pairs_for_target,
    parse_target,
    plan_search,
    room,
)
from lpconvert.runner import LayerRunner
from lpconvert.settings import OBJECTIVES, PlanSettings
from lpconvert.sources import resolve_model

TEXT = " ".join(
    f"The {a} {b} of the {c} {d} across the valley, while {e} people watched from the old stone bridge."
    for a, b, c, d, e in zip(["quick", "slow", "tall", "small", "green", "bright", "quiet"] * 12,
                             ["river", "wind", "train", "song", "light", "storm"] * 14,
                             ["north", "south", "east", "west", "inner"] * 17,
                             ["hills", "fields", "towns", "woods"] * 21,
                             ["many", "few", "some", "old", "young", "tired", "happy"] * 12, strict=False))


@pytest.fixture(scope="module")
def tokenized_model(tiny_models, tmp_path_factory):
    """The tiny llama with a character tokenizer (ids < 128), and a calibration text file."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tok") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    chars = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-\n"
    vocab = {"[UNK]": 0} | {c: i + 1 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    text = folder.parent / "calib.txt"
    text.write_text(TEXT)
    return folder, text


def random_calibrator(model_dir, objective="kl", windows=6, heldout=3, seq_len=16):
    model = resolve_model(str(model_dir)).load_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (windows + heldout, seq_len), generator=g)
    return Calibrator(model, ids[:windows], heldout_ids=ids[windows:], objective=objective, batch_size=4)


# ----------------------------------------------------------------------------------------------
# Targets


def test_targets_resolve_to_pair_counts():
    assert max_pairs(30, False) == 14 and max_pairs(30, True) == 15 and max_pairs(6, False) == 2
    assert pairs_for_target(Target("pairs", 5), 30, False) == 5
    assert pairs_for_target(Target("depth", 25), 30, False) == 5
    assert pairs_for_target(Target("max_loss_increase", 0.05), 30, False) is None
    # Speedup: the fewest pairs whose estimate reaches it, by time ∝ L - ALPHA * K.
    k = pairs_for_target(Target("speedup", 1.1), 30, False)
    assert estimated_speedup(30, k) >= 1.1 > estimated_speedup(30, k - 1)
    assert estimated_speedup(32, 12) == pytest.approx(32 / (32 - 12 * ALPHA))
    assert parse_target(max_loss_increase="5%") == Target("max_loss_increase", 0.05)


@pytest.mark.parametrize("target, message", [
    (Target("pairs", 3), "at most 2 non-overlapping pairs"),
    (Target("depth", 3), "at most 2 non-overlapping pairs"),
    (Target("depth", 6), "not below"),
    (Target("speedup", 1.5), "at most 2 non-overlapping pairs"),
])
def test_impossible_targets_name_the_maximum(target, message):
    with pytest.raises(LPError, match=message):
        pairs_for_target(target, 6, False)
    assert pairs_for_target(Target("pairs", 3), 6, True) == 3


def test_exactly_one_target_is_required_and_a_speedup_must_exceed_1():
    with pytest.raises(LPError, match="exactly one target"):
        parse_target(pairs=2, depth=4)
    with pytest.raises(LPError, match="exactly one target"):
        parse_target()
    with pytest.raises(LPError, match="above 1"):
        parse_target(speedup=0.9)


def test_room_and_contiguous_runs_keep_off_the_edge_layers_unless_allowed():
    assert room([], 6, False) == 2 and room([2], 6, False) == 0 and room([1], 6, False) == 1
    assert contiguous_runs(2, 6, False) == [(1, 3)]
    assert contiguous_runs(2, 6, True) == [(0, 2), (1, 3), (2, 4)]


# ----------------------------------------------------------------------------------------------
# Strategies from the scores alone


def _plan(scores_path, target, **settings):
    from lpconvert.formats import load_scores

    return make_plan(load_scores(scores_path), target, PlanSettings(**settings))


def test_greedy_takes_the_best_pairs_that_still_fit_by_the_chosen_or_default_metric(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    by_loss = _plan(scores, Target("pairs", 1))
    assert by_loss.strategy == "greedy" and by_loss.metric == "loss_increase" and by_loss.pairs == [2]
    # Two pairs: the best pair (2) would leave no room for a second one, so greedy takes 1 and 3.
    assert _plan(scores, Target("depth", 4)).pairs == [1, 3]
    assert _plan(scores, Target("pairs", 1), metric="pair_rel_l2").pairs == [3]
    assert _plan(scores, Target("pairs", 1), metric="pair_cosine").pairs == [3]  # "high" is better
    edges = _plan(scores, Target("pairs", 3), metric="pair_rel_l2", allow_edge_layers=True)
    assert edges.pairs == [0, 2, 4]
    no_loss = write_scores(tmp_path / "n.json", tiny_models["llama"], loss=False)
    assert _plan(no_loss, Target("pairs", 1)).metric == "pair_cosine"


def test_contiguous_strategy_takes_the_run_with_the_best_summed_metric(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    plan = _plan(scores, Target("pairs", 2), strategy="contiguous", allow_edge_layers=True, metric="pair_rel_l2")
    assert plan.pairs == [1, 3]  # 0.3 + 0.1 beats (0, 2) and (2, 4)
    assert _plan(scores, Target("pairs", 1), strategy="contiguous").pairs == [2]


def test_max_loss_increase_sums_single_pair_losses_within_the_budget(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    assert _plan(scores, Target("max_loss_increase", 0.08)).pairs == [1, 3]  # 4% + 3% fits 8%
    small = _plan(scores, Target("max_loss_increase", 0.05))
    assert small.pairs == [2] and small.details["summed_single_pair_loss_increase"] == pytest.approx(0.02)
    assert _plan(scores, Target("max_loss_increase", 0.05), strategy="contiguous").pairs == [2]
    with pytest.raises(LPError, match="no set of pairs"):
        _plan(scores, Target("max_loss_increase", 0.01))
    no_loss = write_scores(tmp_path / "n.json", tiny_models["llama"], loss=False)
    with pytest.raises(LPError, match="needs measured losses"):
        _plan(no_loss, Target("max_loss_increase", 0.05))


def test_plan_details_give_the_depth_and_a_speedup_estimate_reaching_the_target(tiny_models, tmp_path):
    plan = _plan(write_scores(tmp_path / "s.json", tiny_models["llama"]), Target("speedup", 1.2))
    d = plan.details
    assert len(plan.pairs) == 2 and d["effective_depth"] == 4
    assert d["estimated_speedup"] >= 1.2 and "estimate" in d["speedup_note"]
    assert plan.to_json()["target"] == {"kind": "speedup", "value": 1.2}


# ----------------------------------------------------------------------------------------------
# Measuring


@pytest.mark.parametrize("arch", ["llama", "llama-bias", "mistral", "qwen2", "qwen3"])
def test_measure_branches_match_full_runs(arch, tiny_models):
    cal = random_calibrator(tiny_models[arch])
    ids = cal.splits["calib"]
    direct = LayerRunner(cal.runner.model, seq_len=ids.shape[1])
    sets = [(1, 3), (1,), (3,), (2,), ()]
    for base in [(), (1,)]:
        measured = cal.measure(sets, base=base)
        for m in measured:
            with torch.no_grad():
                total, count = direct.nll(direct.run(direct.embed(ids), pairs=m.pairs), ids)
            assert m.loss == pytest.approx(total / count, rel=1e-5)
            assert m.kl >= -1e-6
    assert measured[-1].kl == pytest.approx(0, abs=1e-6) and measured[-1].loss == pytest.approx(cal.base["calib"].loss)
    assert cal.evaluations == 2 * len(sets)
    # The branches re-run only the layers after their first difference from the base.
    assert cal.forward_passes < 1 + 2 * len(sets)


def test_streams_kept_between_steps_change_nothing(tiny_models):
    cached, fresh = random_calibrator(tiny_models["qwen2"], windows=5), random_calibrator(tiny_models["qwen2"], windows=5)
    fresh.cache_limit = 0
    steps = [((), [(1,), (2,), (3,)]), ((3,), [(1, 3), (3,)]), ((1, 3), [(1, 3)]), ((2,), [(0, 2), (2, 4)]),
             ((), [(1, 3)])]
    for base, sets in steps:
        for split in ("calib", "heldout"):
            a, b = cached.measure(sets, base=base, split=split), fresh.measure(sets, base=base, split=split)
            assert [v for m in a for v in (m.loss, m.kl)] == pytest.approx([v for m in b for v in (m.loss, m.kl)], rel=1e-6)
    assert cached.layer_windows < fresh.layer_windows  # streams below the new pair were reused
    assert fresh._cache_bytes == 0


@pytest.mark.parametrize("objective", ["kl", "loss"])
def test_search_grows_a_valid_set(objective, tiny_models, tmp_path):
    cal = random_calibrator(tiny_models["qwen3"], objective=objective)
    choice = plan_search(cal, [1, 2, 3, 0, 4], 2, num_layers=6, allow_edge_layers=False, candidates=3, verify=2)
    assert validate_pairs(choice.pairs, 6) == [1, 3]  # the only two pairs that fit
    assert [step["step"] for step in choice.trace] == [1, 2]
    first = choice.trace[0]["evaluated"]
    assert {tuple(e["pairs"]) for e in first} == {(1,), (3,)}  # (2,) would leave no room for a second pair
    assert any("heldout" in e for e in first) and cal.heldout_evaluations >= 1
    wide = plan_search(cal, [2, 1, 3, 0, 4], 3, num_layers=6, allow_edge_layers=True, candidates=5, beam=2)
    assert len(wide.pairs) == 3 and len(wide.front) == 3


def test_copy_positions_are_tokens_the_window_already_holds():
    from lpconvert.plan.objectives import position_masks

    ids = torch.tensor([[5, 7, 5, 9, 7]])  # predicts 7, 5, 9, 7: the 5 and the second 7 are copies
    reference = (None, None, torch.tensor([[[0.9], [0.2], [0.5], [0.1]]]), None, None)
    none_common = torch.zeros(16, dtype=torch.bool)
    masks = position_masks(ids, reference, none_common)
    assert masks["copy"].tolist() == [[False, True, False, True]]
    assert masks["local"].tolist() == [[True, False, True, False]]
    assert masks["confident"].tolist() == [[True, False, True, False]]  # the source's top probability >= 0.5
    common = none_common.clone()
    common[5] = True  # a common token is never a copy
    assert position_masks(ids, reference, common)["copy"].tolist() == [[False, False, False, True]]


def test_every_objective_is_measured_in_one_pass(tiny_models):
    from lpconvert.plan.objectives import COMBINED_TABLE, COPY_WEIGHT, OBJECTIVE_TABLE

    cal = random_calibrator(tiny_models["llama"])
    assert {*OBJECTIVE_TABLE, *COMBINED_TABLE} == set(OBJECTIVES)  # settings names them without importing this module
    source = cal.base["calib"].values
    assert source["kl"] == pytest.approx(0, abs=1e-6) and source["top1"] == 0 and source["kl_top16"] == pytest.approx(0, abs=1e-6)
    passes = cal.forward_passes
    paired = cal.measure([(1,)])[0]
    assert set(paired.values) == set(OBJECTIVES) and cal.forward_passes - passes <= 1
    v = paired.values
    assert v["kl"] > 0 and 0 < v["top1"] <= 1 and v["kl_top16"] <= v["kl"] + 1e-6  # fewer tokens, less divergence
    assert min(v["copy_loss"], v["local_loss"]) <= v["loss"] <= max(v["copy_loss"], v["local_loss"])
    assert paired.value("copy_loss") == v["copy_loss"] and paired.to_json()["top1"] == pytest.approx(v["top1"], abs=1e-6)
    assert v["top1_copy"] == pytest.approx(v["top1"] + COPY_WEIGHT * v["copy_loss"])


def test_search_first_measures_every_pair_alone(tiny_models):
    cal = random_calibrator(tiny_models["qwen3"], windows=4)
    choice = plan_search(cal, [3], 1, num_layers=cal.num_layers, allow_edge_layers=False, candidates=1, verify=0)
    singles = {tuple(e["pairs"]): e["kl"] for e in choice.trace[0]["evaluated"]}
    assert set(singles) == {(p,) for p in range(1, cal.num_layers - 2)}  # every allowed start, not only the ranking's
    assert choice.pairs == [min(singles, key=singles.get)[0]]


def test_search_respects_loss_budget(tiny_models):
    cal = random_calibrator(tiny_models["mistral"], objective="loss")
    singles = {m.pairs[0]: m.loss for m in cal.measure([(p,) for p in range(5)])}
    base = cal.base["calib"].loss
    budget = (min(singles[p] for p in (1, 2, 3)) / base - 1) + 1e-9
    choice = plan_search(cal, [1, 2, 3], None, num_layers=6, allow_edge_layers=False, loss_budget=budget, verify=0)
    assert len(choice.pairs) >= 1 and choice.measured.loss <= base * (1 + budget)


def test_make_plan_search_records_cost_and_trace(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    from lpconvert.formats import load_scores

    cal = random_calibrator(tiny_models["llama"])
    plan = make_plan(load_scores(scores), Target("depth", 4), calibrator=cal)
    assert plan.strategy == "search" and len(plan.pairs) == 2
    d = plan.details
    assert d["cost"]["set_evaluations"] > 0 and d["cost"]["forward_passes"] > 0 and d["trace"]
    assert d["calibration"]["perplexity"] > 0 and "heldout" in d and d["objective"] == "kl"
    contiguous = make_plan(load_scores(scores), Target("pairs", 2),
                           PlanSettings(strategy="contiguous", allow_edge_layers=True), cal)
    assert len(contiguous.details["trace"][0]["evaluated"]) == 3  # every run of 2 pairs measured
    assert contiguous.pairs in ([0, 2], [1, 3], [2, 4])


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_greedy_plan_file_shows_the_strip_and_drives_an_export(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    result = invoke("plan", scores, "--depth", "4", "-o", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    assert "·╔╝╔╝·" in result.stdout and "estimate" in result.stdout
    plan = load_plan(tmp_path / "plan.json")
    assert plan.pairs == [1, 3] and plan.strategy == "greedy" and plan.metric == "loss_increase"
    exported = invoke("export", tiny_models["llama"], "--plan", tmp_path / "plan.json", "-o", tmp_path / "lp",
                      "--dry-run", "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["pairs"] == [[1, 2], [3, 4]]


def test_cli_prints_the_plan_as_json_and_plots_a_png(tiny_models, tmp_path):
    scores = write_scores(tmp_path / "s.json", tiny_models["llama"])
    result = invoke("plan", scores, "--pairs", "1", "--strategy", "contiguous", "--json", "--plot", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "lpconvert-plan" and data["pairs"] == [[2, 3]] and data["strategy"] == "contiguous"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_with_the_model_records_calibration_cost_and_trace(tokenized_model, tmp_path):
    folder, text = tokenized_model
    scores = write_scores(tmp_path / "s.json", folder)
    result = invoke("plan", scores, "--model", folder, "--calib", text, "--tokens", "256", "--seq-len", "32",
                    "--heldout-tokens", "128", "--depth", "4", "-o", tmp_path / "plan.json", "--plot",
                    tmp_path / "front.png")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.json")
    assert plan.strategy == "search" and plan.pairs == [1, 3]
    assert plan.calibration["source"] == str(text) and plan.calibration["tokens"] == 256
    assert plan.calibration["heldout"]["split"] == "heldout" and plan.calibration["objective"] == "top1_copy"
    assert plan.details["cost"]["set_evaluations"] >= 2 and len(plan.details["trace"]) == 2
    assert (tmp_path / "front.png").stat().st_size > 1000
    speedup = invoke("plan", scores, "--model", folder, "--calib", text, "--tokens", "256", "--seq-len", "32",
                     "--speedup", "1.05", "--strategy", "contiguous", "--objective", "loss", "--json")
    assert speedup.exit_code == 0, speedup.output
    data = json.loads(speedup.stdout)
    assert len(data["pairs"]) == 1 and data["details"]["objective"] == "loss"
    assert data["details"]["estimated_speedup"] >= 1.05


def test_cli_loss_budget_search_stays_within_the_budget(tokenized_model, tmp_path):
    folder, text = tokenized_model
    scores = write_scores(tmp_path / "s.json", folder)
    result = invoke("plan", scores, "--model", folder, "--calib", text, "--tokens", "256", "--seq-len", "32",
                    "--max-loss-increase", "1000%", "--verify", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["pairs"]) == 2 and data["details"]["calibration"]["loss_increase"] <= 10


@pytest.mark.parametrize("target, unpairable, hint", [
    (Target("pairs", 3), (), True),  # 2 fit without the edge layers, 3 with them
    (Target("depth", 3), (), True),
    (Target("depth", 0), (), False),  # 6 pairs never fit in 6 layers
    (Target("depth", 2), (), False),  # 4 pairs: 3 at most, even with the edge layers
    (Target("speedup", 3.0), (), False),
    (Target("pairs", 3), (4,), False),  # Gemma: a local and a global layer never pair, edges or not
])
def test_allowing_the_edge_layers_is_suggested_only_where_it_would_fit(target, unpairable, hint):
    with pytest.raises(LPError) as refused:
        pairs_for_target(target, 6, False, unpairable)
    assert ("--allow-edge-layers" in refused.value.one_line()) == hint, refused.value.one_line()
    if hint:
        assert pairs_for_target(target, 6, True, unpairable) is not None


def test_a_recipe_target_is_refused_naming_its_keys():
    from lpconvert.plan.targets import RECIPE

    with pytest.raises(LPError) as refused:
        pairs_for_target(Target("pairs", 3), 6, False, (), RECIPE)
    assert refused.value.one_line() == ("recipe key plan.target.pairs 3 does not fit: at most 2 non-overlapping pairs "
                                        "fit in a model of 6 layers, first and last layers excluded (ask for fewer or "
                                        "set plan.allow_edge_layers: true)")
    with pytest.raises(LPError) as refused:
        pairs_for_target(Target("depth", 0), 6, False, (), RECIPE)
    assert refused.value.one_line().startswith("recipe key plan.target.depth 0 needs 6 pairs")
    assert refused.value.fix == "ask for depth 4 or more"


def test_a_set_measured_as_nan_is_refused_naming_its_pairs(tiny_models):
    """The source measured finite, then a set does not (as an overflow of a pair would): no search ranks NaN."""
    model = resolve_model(str(tiny_models["llama"])).load_model()
    calibrator = Calibrator(model, torch.randint(0, 128, (2, 16)), batch_size=2)
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")  # after the source's reference
    with pytest.raises(LPError, match=r"plan measured NaN or Inf with the pairs \(2, 3\) run in parallel"):
        calibrator.measure([[2]])
