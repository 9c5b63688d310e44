"""Quality benchmark of every trainer on the toy world; see personalize/toyworld/benchmark.py.

python benchmarks/quality.py                      # all variants x subjects
python benchmarks/quality.py --write-docs         # + the Quality section of docs/benchmarks.md
python benchmarks/quality.py --subjects striped_heart --variants lora --steps 5  # smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.toyworld.benchmark import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
