"""The serving checks that tests/test_serving.py runs for real: tiny exports (tiny_exports.py) in vLLM
(vllm_check.py), under transformers' tensor parallelism (tp_check.py), and SmolLM2 behind `vllm serve`
(vllm_serve_check.py). Each module is also a command (`python tests/serving/vllm_check.py --help`);
scripts/vllm_check.py, scripts/tp_check.py and scripts/vllm_serve_check.py run them under those names.

Tests import these; nothing here imports scripts/.
"""
