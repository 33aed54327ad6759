"""Regenerate ``indexer/events/`` from ``proto/events/*.proto``.

    python scripts/gen_proto.py            # rewrite indexer/events/
    python scripts/gen_proto.py --check    # exit 1 if the committed code is stale
    python scripts/gen_proto.py --out DIR  # write into DIR instead (used by the staleness test)

protoc is the one bundled with grpcio-tools and the ``.pyi`` stubs come from mypy-protobuf, both
pinned in pyproject, so the output depends only on the ``.proto`` sources and is byte-for-byte
reproducible.

protoc is run with ``-I proto`` so the descriptors keep the file names of the seed
(``events/core.proto``) and the package ``events`` that producers and type URLs use.  Its Python
output then assumes a top-level module ``events``; we ship it inside ``indexer`` instead, so the
few lines naming that module are rewritten to ``indexer.events``.  Each rewrite is anchored and
counted: if a future protoc emits a different shape the script fails instead of shipping
half-rewritten code.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_PACKAGE_DIR = PROTO_ROOT / "events"
TARGET_DIR = ROOT / "indexer" / "events"
PYTHON_PACKAGE = "indexer.events"

INIT_PY = '''"""Protobuf classes of the ``events`` package, generated from ``proto/events/*.proto``.

Do not edit: run ``python scripts/gen_proto.py`` after changing a ``.proto`` file.
"""
'''

_IMPORT_LINE = re.compile(r"^from events import (\w+_pb2) as (\w+)$", re.MULTILINE)
_MODULE_NAME = re.compile(
    r"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'events\.(\w+_pb2)'(, _globals\))$",
    re.MULTILINE,
)
_LEFTOVER = re.compile(r"^\s*(from events[ .]|import events\b)", re.MULTILINE)


class GenerationError(RuntimeError):
    pass


def _managed(name: str) -> bool:
    """Files of the target folder that this script owns (and may delete when stale)."""
    return name == "__init__.py" or name.endswith(("_pb2.py", "_pb2.pyi"))


def _protoc_include() -> Path:
    import grpc_tools  # imported late: only the generator needs grpcio-tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def _mypy_plugin() -> str:
    beside_python = Path(sys.executable).parent / "protoc-gen-mypy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("protoc-gen-mypy")
    if found is None:
        raise GenerationError("protoc-gen-mypy not found: pip install the test extra (mypy-protobuf)")
    return found


def _run_protoc(out_dir: Path) -> None:
    sources = sorted(str(p.relative_to(ROOT)) for p in PROTO_PACKAGE_DIR.glob("*.proto"))
    if not sources:
        raise GenerationError(f"no .proto files in {PROTO_PACKAGE_DIR}")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT.relative_to(ROOT)}",
        f"-I{_protoc_include()}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
        f"--python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        *sources,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed ({result.returncode}):\n{result.stderr}")


def _rewrite(name: str, text: str) -> str:
    text, _ = _IMPORT_LINE.subn(rf"from {PYTHON_PACKAGE} import \1 as \2", text)
    if name.endswith(".py"):
        text, count = _MODULE_NAME.subn(rf"\1'{PYTHON_PACKAGE}.\2'\3", text)
        if count != 1:
            raise GenerationError(f"{name}: expected one module-name line, found {count}")
    if _LEFTOVER.search(text):
        raise GenerationError(f"{name}: a reference to the top-level module 'events' was left")
    return text


def render() -> dict[str, str]:
    """The target folder's managed files, name -> content, freshly generated."""
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        out_dir = Path(tmp)
        _run_protoc(out_dir)
        generated = sorted((out_dir / "events").iterdir())
        files = {p.name: _rewrite(p.name, p.read_text(encoding="utf-8")) for p in generated}
    files["__init__.py"] = INIT_PY
    return files


def _current(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(directory.iterdir())
        if p.is_file() and _managed(p.name)
    }


def stale_files(expected: dict[str, str], directory: Path) -> list[str]:
    """Names that are missing, extra or different in ``directory``."""
    actual = _current(directory)
    return sorted(n for n in expected.keys() | actual.keys() if expected.get(n) != actual.get(n))


def write(files: dict[str, str], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in _current(directory).keys() - files.keys():
        (directory / name).unlink()
    for name, text in files.items():
        path = directory / name
        # newline="\n": identical bytes whatever the platform, so --check compares like with like.
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed code is stale")
    parser.add_argument("--out", type=Path, default=TARGET_DIR, help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        files = render()
    except GenerationError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(files, args.out)
        if stale:
            print(f"gen_proto: stale generated code in {args.out}: {', '.join(stale)}", file=sys.stderr)
            print("gen_proto: run `python scripts/gen_proto.py` and commit the result", file=sys.stderr)
            return 1
        return 0
    write(files, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
