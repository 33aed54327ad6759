"""The black-box suite stays an outsider: its modules, and the helpers of tests/support/ they use
(running the product as a subprocess, waiting, reading the table), import nothing of ``indexer``."""

from __future__ import annotations

import subprocess
import sys

from tests.support.process import ROOT

_LOADED = (
    "import importlib, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "print(sorted(m for m in sys.modules if m == 'indexer' or m.startswith('indexer.')))\n"
)


def test_the_black_box_suite_imports_nothing_of_the_product() -> None:
    modules = sorted(f"tests.blackbox.{path.stem}" for path in (ROOT / "tests" / "blackbox").glob("*.py"))
    assert "tests.blackbox.harness" in modules
    done = subprocess.run([sys.executable, "-c", _LOADED, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the black-box suite imports {done.stdout.strip()}"
