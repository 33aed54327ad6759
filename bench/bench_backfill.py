"""Replaced by ``bench/backfill.py`` (1,000,000 rows, same and second database, empty / rerun /
10 % newer, beside the in-SQL merge; ``--json``).  This name is kept for old instructions:

    .venv/bin/python bench/bench_backfill.py [--rows N] [--batch-size N]   # runs bench/backfill.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    target = Path(__file__).with_name("backfill.py")
    args = [arg for arg in sys.argv[1:] if arg != "--snapshot-versions"]  # the source has versions now
    os.execv(sys.executable, [sys.executable, str(target), *args])
