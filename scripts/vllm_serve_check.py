"""`vllm serve` on SmolLM2's export, asked through the OpenAI client, against transformers: the check
tests/test_serving.py runs (tests/serving/vllm_serve_check.py, which documents it), as a command.

    python scripts/vllm_serve_check.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving.vllm_serve_check import main  # noqa: E402

if __name__ == "__main__":
    main()
