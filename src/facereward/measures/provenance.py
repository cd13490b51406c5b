"""What a built measure was built from (docs/methods.md 3.2): its row, its options, and the SHA-256 of every weight
file (or folder) an option names, so a results table records exactly which variant and which weights gave a column."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

_CACHE: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, or of a folder (the hash of its files' relative paths and hashes, in sorted order)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
        return h.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _defaults(build: Any) -> dict[str, Any]:
    """The keyword defaults of a row's builder (after its `env`), so the record shows the options not given too."""
    try:
        params = list(inspect.signature(build).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def measure_provenance(spec: Any, options: dict[str, Any], scorer: Any = None) -> dict[str, Any]:
    """The record of one built measure: name, kind, direction, options, the weight files' hashes, and what the scorer
    states about itself (its `provenance` attribute: variant, input range, resizing)."""
    options = {**_defaults(spec.build), **options}
    files = {}
    for key, value in options.items():
        if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
            files[key] = {"path": str(value), "sha256": file_sha256(value)}
    record = {"measure": spec.name, "kind": spec.kind, "lower_better": spec.lower_better,
              "options": _jsonable(options), "files": files}
    details = getattr(scorer, "provenance", None)
    if isinstance(details, dict) and details:
        record["details"] = _jsonable(details)
    return record


__all__ = ["file_sha256", "measure_provenance"]
