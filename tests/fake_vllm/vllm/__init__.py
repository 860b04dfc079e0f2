"""A stand-in for vLLM in the tests: on PYTHONPATH, it lets any Python pass lpconvert's check of vLLM's
interpreter (`import vllm`, the version lpconvert supports) without vLLM. It runs nothing."""

__version__ = "0.32.0"
