"""Benchmark: export wall time against `cp -r` of the same checkpoint, and peak RSS of the export.

Builds a random-weight Llama-shaped checkpoint (streamed to disk, never whole in memory), then
runs `lpconvert export --pairs ...` in a child process and `cp -r` of the source, each `--repeats`
times from the same start (earlier outputs deleted, `sync`ed so no write-back of an earlier run is
pending, the source read into the page cache), and prints a table and JSON.

    python scripts/results/bench_export.py                      # about 1 GB, bf16, 20 layers, 8 pairs
    python scripts/results/bench_export.py --shape llama2-7b    # 13.5 GB, 32 layers
    python scripts/results/bench_export.py --gguf q8_0          # the same, exported as one GGUF (ggufexport.py)
Targets (issue 3): time <= 1.5x cp, peak RSS <= 1.5 GB whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lpconvert.checkpoint import (  # noqa: E402
    OutputTensor,
    TensorInfo,
    plan_shards,
    shard_file_names,
    write_index,
    write_shard,
)

SHAPES = {
    "1gb": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=20, num_attention_heads=10,
                num_key_value_heads=10, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}


def random_checkpoint(folder: Path, shape: dict, dtype=torch.bfloat16) -> None:
    """A Llama checkpoint of random weights, written tensor by tensor."""
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head_dim = h // shape["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (shape["vocab_size"], h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                   p + "self_attn.k_proj.weight": (kv * head_dim, h), p + "self_attn.v_proj.weight": (kv * head_dim, h),
                   p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (shape["vocab_size"], h)}

    def build(name, s):
        return lambda: iter([(1 + 0.1 * torch.randn(s) if name.endswith("norm.weight") else 0.02 * torch.randn(s))
                             .to(dtype)])

    tensors = [OutputTensor(n, TensorInfo(s, dtype), build(n, s)) for n, s in shapes.items()]
    shards = plan_shards(tensors, 2 * 10**9)
    names = shard_file_names(len(shards))
    folder.mkdir(parents=True)
    for shard, name in zip(shards, names, strict=False):
        write_shard(folder / name, shard, {"format": "pt"})
    if len(shards) > 1:
        write_index(folder, shards, names, {})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
              "dtype": "bfloat16", "rope_theta": 10000.0, **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Real checkpoints ship one (without it the export derives it through transformers, ~1 s more).
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))


def same_start(source: Path, *stale: Path) -> None:
    """Give every timed run the same start: no output of an earlier run, no dirty pages still being
    written back (a run that starts while the previous one's writes drain pays for them), and the
    source read once so it sits in the page cache."""
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
    for file in sorted(source.iterdir()):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def timed_sync() -> float:
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def timed_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process.

    The peak comes from GNU time (`-f %M`) when it is installed: a child forked from this script starts
    with this script's memory, and Linux keeps that high-water mark across exec, so the child's own
    ru_maxrss would report this script's peak (building the random checkpoint) when it is the larger.
    """
    gnu_time = Path("/usr/bin/time")
    measured = [str(gnu_time), "-f", "%M", *cmd] if gnu_time.exists() else cmd
    started = time.perf_counter()
    proc = subprocess.Popen(measured, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    if gnu_time.exists():
        return seconds, int(stderr.strip().splitlines()[-1]) * 1024
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1gb")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the random source here and reuse it on the next run (else a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--gguf", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                        help="export one GGUF of this type instead of the safetensors folder (the source gets "
                             "SmolLM2's tokenizer, and its vocabulary size)")
    args = parser.parse_args()

    shape = dict(SHAPES[args.shape], **({"vocab_size": 49152} if args.gguf else {}))
    layers = shape["num_hidden_layers"]
    first = (layers - 2 * args.pairs) // 2  # pairs in the middle of the stack
    pairs = ",".join(str(first + 2 * k) for k in range(args.pairs))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lp-bench-"))
    source, copy, out = work / "source", work / "copy", work / "out"
    try:
        if not (source / "config.json").exists():
            print(f"building a random {args.shape} checkpoint in {source} ...", flush=True)
            random_checkpoint(source, shape)
            if args.gguf:  # a GGUF carries its tokenizer
                from lpconvert.sources import resolve_model

                for name in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy2(resolve_model("smollm2-135m").path / name, source / name)
        size = sum(p.stat().st_size for p in source.iterdir())
        cp_times, export_times, rss, cp_synced, export_synced = [], [], [], [], []
        for _ in range(args.repeats):
            same_start(source, copy, out)
            cp_times.append(timed_child(["cp", "-r", str(source), str(copy)])[0])
            cp_synced.append(cp_times[-1] + timed_sync())
            same_start(source, copy, out)
            target = ["-o", str(out) + ".gguf", "--gguf-type", args.gguf] if args.gguf else ["-o", str(out)]
            seconds, peak = timed_child([sys.executable, "-m", "lpconvert", "export", str(source), "--pairs", pairs,
                                         *target, "--overwrite", "--json"])
            Path(str(out) + ".gguf").unlink(missing_ok=True)
            export_times.append(seconds)
            export_synced.append(seconds + timed_sync())
            rss.append(peak)
        result = {
            "shape": args.shape, "checkpoint_bytes": size, "pairs": pairs, "gguf": args.gguf,
            "cp_seconds": min(cp_times), "export_seconds": min(export_times),
            "cp_runs": [round(t, 2) for t in cp_times], "export_runs": [round(t, 2) for t in export_times],
            # The same runs until their data is on disk (the command, then `sync`): no dirty-page head start.
            "cp_synced_runs": [round(t, 2) for t in cp_synced],
            "export_synced_runs": [round(t, 2) for t in export_synced],
            "ratio_synced": min(export_synced) / min(cp_synced),
            "ratio_to_cp": min(export_times) / min(cp_times), "peak_rss_bytes": max(rss),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        }
    finally:
        for path in ((copy, out) if args.workdir else (work,)):
            shutil.rmtree(path, ignore_errors=True)
    print(f"| shape | checkpoint | cp -r | export ({args.pairs} pairs) | ratio | on disk: cp + sync | export + sync "
          "| ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {size / 1e9:.2f} GB | {result['cp_seconds']:.2f} s | {result['export_seconds']:.2f} s "
          f"| {result['ratio_to_cp']:.2f}x | {min(cp_synced):.2f} s | {min(export_synced):.2f} s "
          f"| {result['ratio_synced']:.2f}x | {result['peak_rss_bytes'] / 1e9:.2f} GB |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
