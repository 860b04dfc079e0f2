"""The README stays short, its measured figures stay equal to the data they come from, and no link in the
README or docs/ points at a file that is not there. No model runs: JSON and Markdown only.

A figure in README.md carries a marker right after it, `1.24x<!-- fig: vllm_tp2_speedup -->` (invisible on
GitHub); FIGURES says where each one comes from and prints it as the README must."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 170

MARKER = re.compile(r"(\S+?)<!-- fig: (\w+) -->")


def load(name: str):
    return json.loads((DOCS / name).read_text())


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def span(values) -> str:
    values = list(values)
    return f"{min(values):.2f}-{max(values):.2f}x"


def change(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%"


def share(x: float) -> str:
    return f"{x * 100:.1f}%"


# --- docs/gpu_check_7b.json (H200) and docs/gpu_check_7b_h100.json: compiled decode at batch 1 ---

def h200(model: str) -> float:
    rows = load("gpu_check_7b.json")["decode"]
    return next(r["tokens_per_s"] for r in rows
                if r["model"] == model and r["batch"] == 1 and r["cache"] == "static+compiled")


def h100(model: str) -> float:
    run = load("gpu_check_7b_h100.json")["runs"][0]  # run 1: the source, 0 and 7 pairs in the same call
    assert "H100" in run["env"]["gpu"]
    return next(r["decode_tokens_per_s"] for r in run["decode"]
                if r["model"] == model and r["batch"] == 1 and r["mode"] == "compile")


# --- docs/vllm_bench.json: median of the same-round ratios ---

def vllm_rows(part: str) -> list[dict]:
    return next(p["rows"] for p in load("vllm_bench.json")["parts"] if p["part"] == part)


def vllm_tp2(model: str) -> dict:
    return next(r for r in vllm_rows("tp2") if r["model"] == model and r["batch"] == 1)


# --- docs/gguf_bench.json: the 25-block GGUFs' decode against the source's of the same type and runtime ---

def gguf_25_decode_ratios() -> list[float]:
    rows = load("gguf_bench.json")["rows"]
    out = []
    for gguf_type in ("f16", "q8_0"):
        for runtime, speed in rows["25/search"][gguf_type]["speed"].items():
            base = rows["30 (source)"][gguf_type]["speed"][runtime]["decode_tok_s"]
            out.append(round(speed["decode_tok_s"] / base, 2))  # as docs/benchmarks.md prints each ratio
    return out


# --- quality: docs/quality_front*.json (news perplexity of the plans), docs/heal_front*.json, docs/tasks*.json ---

def news_change(front: str, depth: int) -> str:
    data = load(front)
    row = next(r for r in data["rows"] if r["depth"] == depth and r["strategy"] == "search")
    return change(row["heldout_perplexity"], data["evaluation"]["source_perplexity"])


def healed_news_change(front: str, depth: int) -> str:
    data = load(front)
    row = next(r for r in data["rows"] if r["depth"] == depth and r["plan"] == "search" and r["method"] == "lsq")
    return change(row["news"], data["source"]["news"])


def kept(table: str, row_name: str) -> str:
    row = next(r for r in load(table)["rows"] if r["row"] == row_name)
    return share(row["average"]["above_chance"]["retained"])


def kept_of_four(table: str, row_name: str) -> str:
    """The same share where the table has only the 4 tasks answered above chance (the objective study's)."""
    row = next(r for r in load(table)["rows"] if r["row"] == row_name)
    return share(row["average"]["retained"])


# --- memory: docs/bench_scale.json (7B shape, streamed, peak RSS), and two rows measured apart in benchmarks.md ---

def scale(stage: str, dtype: str = "float32") -> dict:
    rows = load("bench_scale.json")["rows"]
    return next(r for r in rows if r["shape"] == "7b" and r["stage"] == stage and r["rc"] == 0
                and r["path"] in ("stream", "default") and r["dtype"] == dtype)


def benchmarks_bold_gib(row_start: str) -> str:
    """The bold GiB figure of the row of docs/benchmarks.md's scale table that starts with ROW_START."""
    line = next(ln for ln in (DOCS / "benchmarks.md").read_text().splitlines() if ln.startswith(row_start))
    gib = float(re.search(r"\*\*([\d.]+) GiB\*\*", line).group(1))
    return f"{gib:.1f}"


FIGURES = {
    "gpu_h200_vs_source": lambda: ratio(h200("lp-7") / h200("source")),
    "gpu_h200_lp_alone": lambda: ratio(h200("lp-7") / h200("lp-0")),
    "gpu_h200_fused_block": lambda: ratio(h200("lp-0") / h200("source")),
    "gpu_h100_vs_source": lambda: ratio(h100("lp-7") / h100("source")),
    "gpu_h100_lp_alone": lambda: ratio(h100("lp-7") / h100("lp-0")),
    "vllm_tp2_speedup": lambda: ratio(vllm_tp2("12 blocks")["decode_ratio"]),
    "vllm_tp2_allreduce_source": lambda: f"{vllm_tp2('source')['collectives_per_step']['all_reduce']:.0f}",
    "vllm_tp2_allreduce_lp": lambda: f"{vllm_tp2('12 blocks')['collectives_per_step']['all_reduce']:.0f}",
    "vllm_tp1_range": lambda: span(r["decode_ratio"] for r in vllm_rows("tp1") if r["model"] != "source"),
    "gguf_decode_25_range": lambda: span(gguf_25_decode_ratios()),
    "smollm2_25_news_ppl": lambda: news_change("quality_front.json", 25),
    "smollm2_25_lsq_news_ppl": lambda: healed_news_change("heal_front.json", 25),
    "smollm2_25_tasks_kept": lambda: kept("tasks.json", "25/search"),
    "smollm2_25_lsq_tasks_kept": lambda: kept("tasks.json", "25/search/lsq"),
    "gemma3_15_news_ppl": lambda: news_change("quality_front_gemma3.json", 15),
    "gemma3_15_lsq_news_ppl": lambda: healed_news_change("heal_front_gemma3.json", 15),
    "gemma3_15_tasks_kept": lambda: kept("tasks_gemma3.json", "15/search"),
    "gemma3_15_lsq_tasks_kept": lambda: kept("tasks_gemma3.json", "15/search/lsq"),
    # the default plans since issue 35 (top1_copy) and the contiguous rule, on the objective study's items
    "gemma3_15_default_kept": lambda: kept_of_four("study_tasks_gemma3.json", "15/8-12-15"),
    "gemma3_15_contiguous_kept": lambda: kept_of_four("study_tasks_gemma3.json", "15/8-12-14"),
    "smollm2_25_default_kept": lambda: kept_of_four("study_tasks_smollm2.json", "25/3-6-20-24-26"),
    "smollm2_25_contiguous_kept": lambda: kept_of_four("study_tasks_smollm2.json", "25/18-20-22-24-26"),
    "mem_7b_score": lambda: f"{scale('score')['peak_rss_gib']:.1f}",
    "mem_7b_heal": lambda: f"{scale('heal')['peak_rss_gib']:.1f}",
    "mem_7b_export": lambda: f"{scale('export', 'bfloat16')['peak_rss_gib']:.1f}",
    "mem_7b_plan": lambda: benchmarks_bold_gib("| plan --model"),
    "mem_7b_eval": lambda: benchmarks_bold_gib("| eval (8 new tokens)"),
    "time_7b_heal_minutes": lambda: f"{scale('heal')['wall_s'] / 60:.0f}",
    "h100_heal_fit_seconds": lambda: f"{load('gpu_check_7b_h100.json')['runs'][0]['checks']['heal_lsq']['seconds']:.1f}",
}


def readme_figures() -> dict[str, str]:
    found: dict[str, str] = {}
    for printed, name in MARKER.findall(README.read_text()):
        assert name not in found, f"README.md marks {name} twice"
        found[name] = printed.strip("*()[],;:")
    return found


def test_every_figure_in_the_readme_is_marked_and_known():
    assert set(readme_figures()) == set(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_readme_figure_equals_its_data(name):
    assert readme_figures()[name] == FIGURES[name](), f"README.md's {name} drifted from its data"


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+)$", text, flags=re.M)}


LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"
