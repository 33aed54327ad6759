"""The Lua scripts of ``scripts/``, read once.  Each touches the keys of one slot only."""

from __future__ import annotations

from importlib.resources import files


def _lua(name: str) -> str:
    return files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")


READ_LUA = _lua("read")
FILL_LUA = _lua("fill")
INVALIDATE_LUA = _lua("invalidate")
TRACK_LUA = _lua("track")
ENTRIES_LUA = _lua("entries")
DROP_STALE_LUA = _lua("drop_stale")
