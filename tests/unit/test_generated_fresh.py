"""The committed ``indexer/events/`` is exactly what ``scripts/gen_proto.py`` makes from ``proto/``."""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.process import ROOT

SCRIPT = ROOT / "scripts" / "gen_proto.py"
COMMITTED = ROOT / "indexer" / "events"


def _generate(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def _managed(directory: Path) -> dict[str, str]:
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(directory.iterdir())
        if p.name == "__init__.py" or p.name.endswith(("_pb2.py", "_pb2.pyi"))
    }


def test_committed_code_is_fresh(tmp_path: Path) -> None:
    result = _generate(["--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    fresh, committed = _managed(tmp_path), _managed(COMMITTED)
    assert sorted(committed) == sorted(fresh), "run `python scripts/gen_proto.py` and commit the result"
    for name, text in fresh.items():
        if committed[name] != text:
            diff = "".join(
                difflib.unified_diff(
                    committed[name].splitlines(keepends=True), text.splitlines(keepends=True), name, "fresh"
                )
            )
            raise AssertionError(f"{name} is stale; run `python scripts/gen_proto.py`:\n{diff[:3000]}")


def test_check_flags_a_stale_copy(tmp_path: Path) -> None:
    copy = tmp_path / "events"
    shutil.copytree(COMMITTED, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _generate(["--check", "--out", str(copy)]).returncode == 0

    (copy / "trigger_pb2.py").write_text("# edited by hand\n", encoding="utf-8")
    result = _generate(["--check", "--out", str(copy)])
    assert result.returncode == 1
    assert "trigger_pb2.py" in result.stderr


def test_regenerating_is_idempotent(tmp_path: Path) -> None:
    copy = tmp_path / "events"
    shutil.copytree(COMMITTED, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "obsolete_pb2.py").write_text("", encoding="utf-8")
    assert _generate(["--out", str(copy)]).returncode == 0
    assert _managed(copy) == _managed(COMMITTED)  # stale modules removed, the rest unchanged
