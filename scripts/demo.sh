#!/usr/bin/env bash
# `make demo`: the pipeline on SmolLM2-135M-Instruct, offline. Each stage's issue extends it.
set -euo pipefail
cd "$(dirname "$0")/.."
LP=".venv/bin/lpconvert"
OUT="${DEMO_OUT:-demo-out}"
mkdir -p "$OUT" "$OUT/gguf"  # a GGUF's folder is a model's: no other output of lpconvert goes beside it

echo "== 1. inspect the built-in SmolLM2 (converted once from its GGUF into the user cache)"
$LP inspect smollm2-135m

echo
echo "== 2. score layers and pairs on 4k tokens of the Wikipedia sample (the default is 16k)"
$LP score smollm2-135m --calib wiki --tokens 4096 -o "$OUT/scores.json" --plot "$OUT/scores.png" \
    --overwrite

echo
echo "== 3. plan 27 blocks: search measures the model with every candidate set (2k tokens to keep the demo short)"
$LP plan "$OUT/scores.json" --model smollm2-135m --depth 27 --tokens 2048 --heldout-tokens 4096 \
    -o "$OUT/plan.json" --plot "$OUT/plan.png" --overwrite

echo
echo "== 4. heal the plan's pairs: least-squares refit of each pair's down_proj (8k tokens to keep the demo short)"
$LP heal smollm2-135m --plan "$OUT/plan.json" --tokens 8192 --heldout-tokens 2048 \
    -o "$OUT/heal.safetensors" --plot "$OUT/heal.png" --overwrite

echo
echo "== 5. export the plan with the healed weights: 30 layers -> 27 blocks (bfloat16)"
$LP export smollm2-135m --plan "$OUT/plan.json" --heal "$OUT/heal.safetensors" --dtype bfloat16 \
    -o "$OUT/smollm2-lp27" --overwrite

echo
echo "== 6. load the export with plain transformers (trust_remote_code) and generate"
.venv/bin/python - "$OUT/smollm2-lp27" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
messages = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
print(f"{type(model).__name__} with {model.config.num_hidden_layers} blocks:",
      repr(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)))
PY

echo
echo "== 6b. the same plan and heal as one GGUF for llama.cpp (architecture deci), run in llama.cpp (llama-cpp-python)"
$LP export smollm2-135m --plan "$OUT/plan.json" --heal "$OUT/heal.safetensors" --gguf-type q8_0 \
    -o "$OUT/gguf/smollm2-lp27.gguf" --overwrite
# Through lpconvert's llama.cpp runner: its own process, with llama.cpp's weight repacking off on CPUs with AMX,
# where q8_0 crashes with it (docs/gguf.md).
.venv/bin/python - "$OUT/gguf/smollm2-lp27.gguf" <<'PY'
import sys
from lpconvert.llamacpp import open_gguf

with open_gguf(sys.argv[1], n_ctx=512, exact=False) as llm:
    reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=24, temperature=0)
    print(f"llama.cpp, {llm.metadata['deci.block_count']} blocks:", repr(reply["choices"][0]["message"]["content"]))
PY
echo "   in llama.cpp itself: llama-cli -m $OUT/gguf/smollm2-lp27.gguf -cnv (on a CPU with AMX add --no-repack)"

echo
echo "== 7. benchmark accuracy through lm-evaluation-harness: the source and the export on the same 20 items per core task"
$LP eval smollm2-135m "$OUT/smollm2-lp27" --tasks core --limit 20 --device cpu

echo
echo "== 8. one-shot convert for CI: score -> plan -> export -> eval with the recipe configs/smollm2-135m.yaml"
$LP convert smollm2-135m -o "$OUT/smollm2-converted" --recipe configs/smollm2-135m.yaml --overwrite
