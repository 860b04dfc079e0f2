"""transformers' tensor parallelism (torchrun, gloo) on lpconvert exports against one process: the check
tests/test_serving.py runs (tests/serving/tp_check.py, which documents it), as a command.

    python scripts/tp_check.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving.tp_check import main  # noqa: E402

if __name__ == "__main__":
    main()
