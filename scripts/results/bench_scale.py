"""Scale benchmark (issue 33): peak memory and wall time of every pipeline stage on 7B- and 70B-wide models.

For each shape, a random Llama checkpoint (bf16, 2GB safetensors shards, vocab 49152 with SmolLM2's
tokenizer) is built once in --work and reused. Then every stage runs as a subprocess of the real CLI,
under /usr/bin/time (peak RSS of the largest process, wall seconds; psutil polling of the process tree
where /usr/bin/time is missing):

- score  MODEL --tokens T --seq-len S                      (also with --dtype bfloat16)
- plan   scores.json --pairs K --strategy greedy           (the pairs are then fixed to the shape's list)
- heal   MODEL --plan plan.json --tokens H --heldout-tokens HO --seq-len S   (lsq)
- export MODEL --plan plan.json --heal heal.safetensors -o OUT
- eval   MODEL OUT --tokens T --seq-len S --json

each on the streaming default, and again with `--load whole` (the in-memory path) where the stage has
that option and the model fits: parameters x bytes of the compute dtype (x2 for eval: two models),
plus 2 GB, under the available memory. A plain transformers baseline loads the checkpoint
(AutoModelForCausalLM, bfloat16) and runs one forward pass over the same tokens (seq-len windows, batch 4).

Shapes: 7b (Llama-2-7B: hidden 4096, 32 layers), 7b-16 (the same, 16 layers: memory should be flat in
depth), 70b-2 and 70b-4 (Llama-3-70B width: hidden 8192, 8 KV heads, 2 and 4 layers). From two depths of
one width it fits cost = fixed + per-layer x layers per stage and extrapolates to full depth (80 layers
for 70B). A stage that fails (nonzero exit, 137 when killed for memory) is recorded with its exit code
and the last line of its stderr, and the benchmark goes on.

    .venv/bin/python scripts/results/bench_scale.py --shapes 7b,7b-16        # ~14 + 7 GB of checkpoints in /tmp/lp_scale
    .venv/bin/python scripts/results/bench_scale.py --shapes 70b-2,70b-4     # the 80-layer extrapolation
    .venv/bin/python scripts/results/bench_scale.py --tiny                   # tiny-2,tiny-4 (hidden 64): about 3 min, mostly CLI start-up
    .venv/bin/python scripts/results/bench_scale.py --build-only --shapes 7b # just build (and time) the checkpoint

Writes --json (default docs/bench_scale.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "lpconvert"
PYTHON = ROOT / ".venv" / "bin" / "python"
TIME = Path("/usr/bin/time")
VOCAB = 49152  # SmolLM2's tokenizer: every id it makes is < 49152
SHARD_BYTES = 2 * 1000**3
INIT_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
GIB = 1024**3

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-5}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "rms_norm_eps": 1e-5}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
# name -> (width, layers, pairs): the same pairs at both depths of a width, so the depth difference is depth only
SHAPES = {
    "7b": (LLAMA2_7B, 32, [6, 8]),
    "7b-16": (LLAMA2_7B, 16, [6, 8]),
    "70b-2": (LLAMA3_70B, 2, [0]),
    "70b-4": (LLAMA3_70B, 4, [0]),
    "tiny-2": (TINY, 2, [0]),
    "tiny-4": (TINY, 4, [0]),
}
# width -> (the two depths measured, the full depth to extrapolate to)
FAMILIES = {"7B": (("7b-16", "7b"), 32), "70B": (("70b-2", "70b-4"), 80), "tiny": (("tiny-2", "tiny-4"), 80)}
STAGES = ("score", "plan", "heal", "export", "eval")
DEFAULT_DTYPE = {"score": "float32", "heal": "float32", "eval": "float32", "export": "bfloat16"}  # CLI defaults


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def shape_config(name: str):
    from transformers import LlamaConfig

    width, layers, _ = SHAPES[name]
    return LlamaConfig(**width, num_hidden_layers=layers, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, tie_word_embeddings=False, initializer_range=INIT_STD,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16")


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """The checkpoint's tensors in model order, from a model on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def shard_groups(shapes: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple]]]:
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def random_tensor(index: int, name: str, shape: tuple[int, ...], seed: int):
    """bf16 N(0, INIT_STD) weights, ones for norms; seeded per tensor so a shard is the same whatever came before."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    torch.manual_seed(seed * 100003 + index)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD)


def copy_tokenizer(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from lpconvert.sources import smollm2_folder

    source = Path(smollm2_folder())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def build_checkpoint(name: str, folder: Path, seed: int) -> dict:
    """Write the shape's random checkpoint shard by shard (one shard in memory at a time)."""
    from safetensors.torch import save_file

    config = shape_config(name)
    shapes = tensor_shapes(config)
    groups = shard_groups(shapes, SHARD_BYTES)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    copy_tokenizer(folder)
    weight_map, index = {}, 0
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for tensor_name, shape in group:
            shard[tensor_name] = random_tensor(index, tensor_name, shape, seed)
            weight_map[tensor_name] = file
            index += 1
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
        log(f"  {name}: shard {number}/{len(groups)} written")
    total = sum(2 * math.prod(shape) for _, shape in shapes)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return {"parameters": sum(math.prod(shape) for _, shape in shapes), "bytes": total, "shards": len(groups)}


def checkpoint_spec(name: str, seed: int) -> dict:
    width, layers, _ = SHAPES[name]
    return {"shape": name, "width": width, "layers": layers, "vocab": VOCAB, "seed": seed, "std": INIT_STD}


def ensure_checkpoint(name: str, work: Path, seed: int) -> tuple[Path, dict]:
    """The cached checkpoint (complete: its marker matches), else built in a child under /usr/bin/time."""
    folder = work / "models" / name
    marker = folder / "bench_scale_complete.json"
    spec = checkpoint_spec(name, seed)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("spec") == spec:
            log(f"{name}: reusing {folder}")
            return folder, done
    shutil.rmtree(folder, ignore_errors=True)
    log(f"{name}: building {folder}")
    command = [str(python()), __file__, "--build-child", name, "--build-folder", str(folder), "--seed", str(seed)]
    result = measure(command, work / "logs" / f"build-{name}")
    if result["rc"] != 0:
        raise SystemExit(f"building {name} failed (exit {result['rc']}): {result['error']}")
    info = json.loads(result["stdout"].strip().splitlines()[-1])
    done = {"spec": spec, **info, "build_seconds": result["wall_s"], "build_peak_rss_gib": result["peak_rss_gib"]}
    marker.write_text(json.dumps(done, indent=2) + "\n")
    log(f"{name}: built in {result['wall_s']:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB")
    return folder, done


def estimated_bytes(name: str) -> int:
    return 2 * sum(math.prod(shape) for _, shape in tensor_shapes(shape_config(name)))


# ---------------------------------------------------------------------------------------------------------
# measuring one command


def python() -> Path:
    return PYTHON if PYTHON.exists() else Path(sys.executable)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def measure(command: list[str], stem: Path) -> dict:
    """Run `command`; its exit code, peak RSS (GiB), wall seconds, stdout and the last line of stderr."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
    if TIME.exists():
        rc, peak_kb, wall = run_timed(command, stem.with_suffix(".time"), out, err)
    else:
        rc, peak_kb, wall = run_polled(command, out, err)
    result = {"rc": rc, "peak_rss_gib": None if peak_kb is None else peak_kb / 1024**2, "wall_s": wall,
              "stdout": out.read_text(errors="replace")}
    result["error"] = last_line(err.read_text(errors="replace")) if rc else ""
    if rc > 128 and not result["error"]:
        result["error"] = f"killed by signal {rc - 128}" + (" (out of memory?)" if rc == 137 else "")
    return result


def run_timed(command: list[str], timefile: Path, out: Path, err: Path) -> tuple[int, int | None, float]:
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        rc = subprocess.run([str(TIME), "-f", "%M %e", "-o", str(timefile), *command], stdout=stdout,
                            stderr=stderr).returncode
    wall = time.perf_counter() - started
    fields = timefile.read_text().split() if timefile.is_file() else []  # "Command exited ..." lines come first
    peak = int(fields[-2]) if len(fields) >= 2 and fields[-2].isdigit() else None
    return rc, peak, wall


def run_polled(command: list[str], out: Path, err: Path) -> tuple[int, int | None, float]:
    """Without /usr/bin/time: the largest summed RSS of the process tree, polled every 0.1 s."""
    import psutil

    peak = [0]
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        done = threading.Event()

        def poll() -> None:
            root = psutil.Process(process.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                done.wait(0.1)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        rc = process.wait()
        done.set()
        watcher.join()
    rc = 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention, as /usr/bin/time reports it
    return rc, peak[0] // 1024, time.perf_counter() - started


def warm_page_cache(folder: Path) -> None:
    """Read the checkpoint's shards once before a timed run, so every path starts from the page cache (the first
    run after a build or another path's run would otherwise pay the disk reads alone)."""
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb") as f:
            while f.read(64 * 2**20):
                pass


def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def has_load_option(stage: str) -> bool:
    help_text = subprocess.run([str(CLI), stage, "--help"], capture_output=True, text=True,
                               env={**os.environ, "COLUMNS": "200"}).stdout
    return re.search(r"--load\b", help_text) is not None


# ---------------------------------------------------------------------------------------------------------
# the stages of one shape


class ShapeRun:
    """Every stage of one shape, each path, recorded as rows."""

    def __init__(self, name: str, model: Path, info: dict, folder: Path, args, load_option: dict[str, bool]):
        self.name, self.model, self.info, self.folder, self.args = name, model, info, folder, args
        self.load_option = load_option
        self.rows: list[dict] = []
        _, self.layers, self.pairs = SHAPES[name]
        self.edge = any(p == 0 or p + 1 == self.layers - 1 for p in self.pairs)

    def paths(self, stage: str, dtype: str, models: int = 1) -> list[tuple[str, list[str], str]]:
        """(path, extra CLI options, note) to run: the default (streaming) path, then --load whole."""
        if not self.load_option[stage]:
            return [("default", [], "no --load option yet: the CLI's default path")]
        runs = [("stream", [], "")]
        need = models * self.info["parameters"] * (4 if dtype == "float32" else 2) + 2 * GIB
        if need < available_bytes():
            runs.append(("whole", ["--load", "whole"], ""))
        else:
            self.skip(stage, "whole", dtype, f"needs ~{need / GIB:.0f} GiB, {available_bytes() / GIB:.0f} GiB available")
        return runs

    def skip(self, stage: str, path: str, dtype: str, why: str) -> None:
        self.rows.append({"shape": self.name, "stage": stage, "path": path, "dtype": dtype, "rc": None,
                          "peak_rss_gib": None, "wall_s": None, "note": f"skipped: {why}"})

    def run(self, stage: str, path: str, dtype: str, command: list[str], note: str = "") -> dict:
        log(f"{self.name}: {stage} ({path}, {dtype})")
        warm_page_cache(self.model)
        stem = "-".join(part for part in (stage, path, dtype) if part != "-")
        result = measure(command, self.folder / "logs" / stem)
        row = {"shape": self.name, "stage": stage, "path": path, "dtype": dtype, "rc": result["rc"],
               "peak_rss_gib": result["peak_rss_gib"], "wall_s": result["wall_s"],
               "note": result["error"] if result["rc"] else note}
        self.rows.append(row)
        status = "ok" if result["rc"] == 0 else f"FAILED (exit {result['rc']}): {result['error']}"
        rss = "?" if row["peak_rss_gib"] is None else f"{row['peak_rss_gib']:.2f}"
        log(f"  {status}; {row['wall_s']:.1f} s, peak RSS {rss} GiB")
        return result

    def lp(self, *arguments: str) -> list[str]:
        return [str(CLI), "--progress", "off", *arguments]

    def score(self) -> Path | None:
        """Scores at the CLI's default dtype and at bfloat16 (what fits a 7B in memory here), each path."""
        a, kept = self.args, None
        for dtype in ("float32", "bfloat16"):
            for path, extra, note in self.paths("score", dtype):
                out = self.folder / f"scores-{path}-{dtype}.json"
                result = self.run("score", path, dtype, self.lp(
                    "score", str(self.model), "--tokens", str(a.tokens), "--seq-len", str(a.seq_len),
                    "--dtype", dtype, "--device", "cpu", "-o", str(out), "--overwrite", *extra), note)
                if result["rc"] == 0 and kept is None:
                    kept = out
        return kept

    def plan(self, scores: Path | None) -> Path | None:
        if scores is None:
            self.skip("plan", "-", "-", "no scores")
            return None
        plan = self.folder / "plan.json"
        result = self.run("plan", "-", "-", self.lp(
            "plan", str(scores), "--pairs", str(len(self.pairs)), "--strategy", "greedy", "--metric", "pair_cosine",
            *(["--allow-edge-layers"] if self.edge else []), "-o", str(plan), "--overwrite"))
        if result["rc"] != 0:
            return None
        data = json.loads(plan.read_text())
        chosen = [p[0] for p in data["pairs"]]
        if chosen != self.pairs:  # the same pairs at every depth and on every rerun: the shape's fixed list
            data["pairs"] = [[p, p + 1] for p in self.pairs]
            plan.write_text(json.dumps(data, indent=2) + "\n")
            self.rows[-1]["note"] = f"greedy chose {chosen}; fixed to {self.pairs}"
        return plan

    def heal(self, plan: Path) -> dict[str, Path]:
        a, made = self.args, {}
        for path, extra, note in self.paths("heal", "float32"):
            out = self.folder / f"heal-{path}.safetensors"
            result = self.run("heal", path, "float32", self.lp(
                "heal", str(self.model), "--plan", str(plan), "--tokens", str(a.heal_tokens), "--heldout-tokens",
                str(a.heldout_tokens), "--seq-len", str(a.seq_len), "--device", "cpu", "-o", str(out),
                "--overwrite", *extra), note)
            if result["rc"] == 0:
                made[path] = out
        return made

    def export_and_eval(self, plan: Path, heals: dict[str, Path]) -> None:
        """Export on each path, then eval on each path; one export kept for eval (the first: both hold the same
        weights), the others deleted as soon as written, and that one after eval (disk)."""
        a, exports = self.args, {}
        for path, extra, note in self.paths("export", "bfloat16"):
            out = self.folder / f"export-{path}"
            heal = heals.get(path) or next(iter(heals.values()), None)
            result = self.run("export", path, "bfloat16", self.lp(
                "export", str(self.model), "--plan", str(plan), *(["--heal", str(heal)] if heal else []),
                *(["--allow-edge-layers"] if self.edge else []), "-o", str(out), "--overwrite", *extra),
                note if heal else (note + "; no heal file").strip("; "))
            if result["rc"] == 0 and not exports:
                exports[path] = out
            elif not a.keep_exports:
                shutil.rmtree(out, ignore_errors=True)
        for path, extra, note in self.paths("eval", "float32", models=2):
            out = next(iter(exports.values()), None)
            if out is None:
                self.skip("eval", path, "float32", "no export")
                continue
            self.run("eval", path, "float32", self.lp(
                "eval", str(self.model), str(out), "--tokens", str(a.tokens), "--seq-len", str(a.seq_len),
                "--device", "cpu", "--json", *extra), note)
        if not a.keep_exports:
            for out in exports.values():
                shutil.rmtree(out, ignore_errors=True)

    def baseline(self) -> None:
        need = self.info["parameters"] * 2 + 2 * GIB
        if need >= available_bytes():
            self.skip("forward", "transformers", "bfloat16", f"needs ~{need / GIB:.0f} GiB")
            return
        command = [str(python()), __file__, "--baseline-child", str(self.model), "--tokens", str(self.args.tokens),
                   "--seq-len", str(self.args.seq_len)]
        result = self.run("forward", "transformers", "bfloat16", command)
        if result["rc"] == 0:
            self.rows[-1].update(json.loads(result["stdout"].strip().splitlines()[-1]))

    def all(self) -> list[dict]:
        scores = self.score()
        plan = self.plan(scores)
        if plan is None:
            for stage in ("heal", "export", "eval"):
                self.skip(stage, "-", "-", "no plan")
        else:
            heals = self.heal(plan)
            self.export_and_eval(plan, heals)
        self.baseline()
        return self.rows


# ---------------------------------------------------------------------------------------------------------
# the transformers baseline (run in a child process so its peak RSS is its own)


def baseline_child(model: str, tokens: int, seq_len: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    windows = torch.randint(3, VOCAB, (max(1, tokens // seq_len), seq_len))
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.split(4):
            logits = loaded(batch).logits
            assert torch.isfinite(logits).all(), "non-finite logits"
    print(json.dumps({"load_s": load_s, "forward_s": time.perf_counter() - started}))


# ---------------------------------------------------------------------------------------------------------
# results


def add_ratios(rows: list[dict]) -> None:
    """stream wall time / whole wall time, for the same shape, stage and dtype measured in this run."""
    whole = {(r["shape"], r["stage"], r["dtype"]): r["wall_s"] for r in rows if r["path"] == "whole" and r["rc"] == 0}
    for row in rows:
        key = (row["shape"], row["stage"], row["dtype"])
        if row["path"] == "stream" and row["rc"] == 0 and whole.get(key):
            row["stream_over_whole"] = row["wall_s"] / whole[key]


def extrapolate(rows: list[dict]) -> list[dict]:
    """Per width with two depths measured: cost = fixed + per_layer x layers, at the width's full depth."""
    found = []
    ok = {(r["shape"], r["stage"], r["path"], r["dtype"]): r for r in rows if r["rc"] == 0}
    for family, ((low, high), depth) in FAMILIES.items():
        n_low, n_high = SHAPES[low][1], SHAPES[high][1]
        for (shape, stage, path, dtype), row in ok.items():
            other = ok.get((low, stage, path, dtype))
            if shape != high or other is None:
                continue
            fit = {"family": family, "stage": stage, "path": path, "dtype": dtype, "layers": depth,
                   "from": f"{low}, {high}"}
            for key in ("peak_rss_gib", "wall_s"):
                if row[key] is None or other[key] is None:
                    continue
                slope = (row[key] - other[key]) / (n_high - n_low)
                fixed = row[key] - slope * n_high
                fit[f"{key}_per_layer"], fit[f"{key}_fixed"], fit[key] = slope, fixed, fixed + slope * depth
            found.append(fit)
    return found


def number(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def print_tables(rows: list[dict], fits: list[dict], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Scale benchmark: peak RSS and wall time per stage")
    for column in ("shape", "stage", "path", "dtype", "exit", "peak RSS GiB", "wall s", "stream/whole", "note"):
        table.add_column(column, justify="right" if column in ("exit", "peak RSS GiB", "wall s", "stream/whole")
                         else "left")
    for r in rows:
        note = r["note"]
        if "load_s" in r:
            note = f"load {r['load_s']:.1f} s, forward {r['forward_s']:.1f} s"
        table.add_row(r["shape"], r["stage"], r["path"], r["dtype"], "" if r["rc"] is None else str(r["rc"]),
                      number(r["peak_rss_gib"]), number(r["wall_s"], 1), number(r.get("stream_over_whole")), note)
    console = Console(width=200)
    console.print(table)
    if fits:
        table = Table(title="Extrapolated to full depth: cost = fixed + per layer x layers")
        for column in ("width", "stage", "path", "dtype", "from", "layers", "RSS GiB/layer", "RSS GiB",
                       "s/layer", "fixed s", "wall s"):
            table.add_column(column)
        for f in fits:
            table.add_row(f["family"], f["stage"], f["path"], f["dtype"], f["from"], str(f["layers"]),
                          number(f.get("peak_rss_gib_per_layer"), 3), number(f.get("peak_rss_gib")),
                          number(f.get("wall_s_per_layer"), 1), number(f.get("wall_s_fixed"), 1),
                          number(f.get("wall_s"), 0))
        console.print(table)
    for note in notes:
        console.print(f"- {note}")


def table_notes(args, load_option: dict[str, bool], built: dict) -> list[str]:
    notes = [f"Random Llama checkpoints (bf16, N(0, {INIT_STD}) weights), vocab {VOCAB}: SmolLM2's tokenizer, whose "
             f"ids are all < {VOCAB}. Tokens: score/eval {args.tokens}, heal {args.heal_tokens} + "
             f"{args.heldout_tokens} held out, seq-len {args.seq_len}; transformers: one bf16 forward over "
             f"{args.tokens} tokens, batch 4.",
             "Peak RSS: " + ("/usr/bin/time %M (the largest process)" if TIME.exists()
                             else "psutil, the process tree's summed RSS") + "; exit 137 = killed (memory).",
             "whole runs only where parameters x dtype bytes (x2 for eval) + 2 GB < available memory.",
             "Before every timed run the checkpoint's shards are read once (page cache warm for every path).",
             f"Machine: {os.cpu_count()} CPUs, {total_memory() / GIB:.0f} GiB RAM."]
    missing = [stage for stage, has in load_option.items() if not has and stage != "plan"]
    if missing:
        notes.append(f"No --load option in: {', '.join(missing)} (path 'default' = the CLI's current default; "
                     "no whole runs).")
    for family, ((low, high), depth) in FAMILIES.items():
        if low in built and high in built:
            per_layer = (built[high]["parameters"] - built[low]["parameters"]) / (SHAPES[high][1] - SHAPES[low][1])
            params = built[high]["parameters"] + per_layer * (depth - SHAPES[high][1])
            notes.append(f"{family} at {depth} layers: {params / 1e9:.1f} B parameters, {2 * params / GIB:.0f} GiB in "
                         f"bf16, {4 * params / GIB:.0f} GiB in float32 (what a whole path would hold).")
    for name, info in built.items():
        notes.append(f"{name}: {info['parameters'] / 1e9:.2f} B parameters, {info['shards']} shard(s), built in "
                     f"{info['build_seconds']:.0f} s at {info['build_peak_rss_gib']:.2f} GiB peak RSS (when first built).")
    return notes


def total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


# ---------------------------------------------------------------------------------------------------------


def check_disk(names: list[str], work: Path) -> None:
    """Refuse shapes whose checkpoint (plus one export of the same size) cannot fit the free disk."""
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    for name in names:
        folder = work / "models" / name
        cached = (folder / "bench_scale_complete.json").is_file()
        need = estimated_bytes(name) * (1 if cached else 2) + 2 * GIB
        if need > free:
            raise SystemExit(f"{name} needs ~{need / GIB:.0f} GiB of disk (checkpoint + export), {free / GIB:.0f} "
                             f"GiB free in {work}; delete {work / 'models'}/* shapes you don't need")
        free -= need - estimated_bytes(name)  # the export is deleted after its eval


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"Comma-separated, of: {', '.join(SHAPES)} (default: 7b,7b-16; "
                        "with --tiny, tiny-2,tiny-4).")
    parser.add_argument("--tiny", "--dry-run", action="store_true",
                        help="Check the script: tiny-2,tiny-4 (hidden 64, 2 heads) with small token budgets.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lp_scale"), help="Checkpoints and outputs.")
    parser.add_argument("--tokens", type=int, default=512, help="score and eval tokens; the baseline's forward.")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heal-tokens", type=int, default=1024)
    parser.add_argument("--heldout-tokens", type=int, default=512, help="heal's held-out tokens.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument("--json", type=Path, help="Where to write the results (default: docs/bench_scale.json; "
                        "with --tiny, WORK/bench_scale.json).")
    parser.add_argument("--build-only", action="store_true", help="Build (or find) the checkpoints and stop.")
    parser.add_argument("--keep-exports", action="store_true", help="Keep each export (default: deleted after eval).")
    parser.add_argument("--drop-checkpoints", action="store_true", help="Delete each shape's checkpoint when done.")
    parser.add_argument("--build-child", help=argparse.SUPPRESS)
    parser.add_argument("--build-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes = args.shapes or "tiny-2,tiny-4"
        args.tokens, args.seq_len, args.heal_tokens, args.heldout_tokens = 256, 64, 256, 128
        args.work = args.work / "tiny" if args.work == Path("/tmp/lp_scale") else args.work
    args.shapes = args.shapes or "7b,7b-16"
    if args.json is None:
        args.json = args.work / "bench_scale.json" if args.tiny else ROOT / "docs" / "bench_scale.json"
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    return args


def main() -> None:
    args = parse_args()
    if args.build_child:
        print(json.dumps(build_checkpoint(args.build_child, args.build_folder, args.seed)))
        return
    if args.baseline_child:
        baseline_child(args.baseline_child, args.tokens, args.seq_len)
        return
    names = args.shapes.split(",")
    check_disk(names, args.work)
    load_option = {stage: has_load_option(stage) for stage in STAGES}
    rows, built = [], {}
    for name in names:
        model, info = ensure_checkpoint(name, args.work, args.seed)
        built[name] = info
        if args.build_only:
            continue
        folder = args.work / "runs" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rows += ShapeRun(name, model, info, folder, args, load_option).all()
        if args.drop_checkpoints:
            shutil.rmtree(model, ignore_errors=True)
    add_ratios(rows)
    fits = extrapolate(rows)
    notes = table_notes(args, load_option, built)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "memory_gib": total_memory() / GIB},
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if not k.endswith("child") and k != "build_folder"},
              "load_option": load_option, "checkpoints": built, "rows": rows, "extrapolated": fits, "notes": notes}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False, suffix=".tmp") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    os.replace(handle.name, args.json)
    if rows:
        print_tables(rows, fits, notes)
    else:
        print("\n".join(notes))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
