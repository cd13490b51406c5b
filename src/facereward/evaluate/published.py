"""`evaluate --check-published TABLE.json` (docs/evaluation.md): does this run reproduce a published table?

A published table names its source, the values per method and measure, the tolerance per measure (absolute, or
relative as a fraction), and optionally the provenance it was made with: per measure, the weight file's SHA-256 (or
its prefix, as pyiqa's file names carry) and options, and evaluate settings such as sample_steps:

    {"source": "a paper, Table 2",
     "rows": {"base": {"psnr": 18.55, "ids": 0.5087}},
     "tolerance": {"default": 0.01, "psnr": 0.05},
     "relative_tolerance": {"fid": 0.02},
     "provenance": {"psnr": {"options": {"crop_border": 0, "y_channel": false}},
                    "musiq-koniq": {"sha256": "e95806b9"}},
     "settings": {"sample_steps": 50, "seed": 0}}

Cells are matched by method name and measure name (the run's provenance maps each column to its measure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TABLE_KEYS = {"source", "rows", "tolerance", "relative_tolerance", "provenance", "settings", "notes"}


def read_published(path: str | Path) -> dict[str, Any]:
    """A published table, checked for shape; every problem is a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such published table")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object")
    unknown = sorted(set(table) - TABLE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TABLE_KEYS))})")
    rows = table.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise ValueError(f"{path}: 'rows' must map method names to {{measure: value}}")
    for method, cells in rows.items():
        if not isinstance(cells, dict) or not cells:
            raise ValueError(f"{path}: rows.{method} must map measure names to numbers")
        for measure, value in cells.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}: rows.{method}.{measure} must be a number, got {value!r}")
    for key in ("tolerance", "relative_tolerance"):
        for measure, value in (table.get(key) or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{path}: {key}.{measure} must be a number >= 0, got {value!r}")
    return table


def _tolerance(table: dict[str, Any], measure: str, published: float) -> float:
    relative = table.get("relative_tolerance") or {}
    absolute = table.get("tolerance") or {}
    if measure in relative:
        return float(relative[measure]) * abs(published)
    if measure in absolute:
        return float(absolute[measure])
    if "default" in relative:
        return float(relative["default"]) * abs(published)
    return float(absolute.get("default", 0.0))


def check_published(table: dict[str, Any], rows: dict[str, dict[str, float]], provenance: dict[str, dict[str, Any]],
                    config: dict[str, Any]) -> dict[str, Any]:
    """Compare a run (its rows, per-column provenance and config) with a published table: every cell within its
    tolerance, every stated provenance equal. Returns {"ok", "cells": [...], "provenance": [...], "source"}."""
    by_measure = {p["measure"]: column for column, p in provenance.items()}
    cells, mismatches = [], []
    for method, published_cells in table["rows"].items():
        for measure, published in published_cells.items():
            column = by_measure.get(measure)
            ours = rows.get(method, {}).get(column) if column else None
            tol = _tolerance(table, measure, float(published))
            if ours is None or math.isnan(ours):
                why = "method not evaluated" if method not in rows else "measure not evaluated"
                cells.append({"method": method, "measure": measure, "published": published, "ours": None,
                              "difference": None, "tolerance": tol, "ok": False, "why": why})
                continue
            diff = float(ours) - float(published)
            cells.append({"method": method, "measure": measure, "column": column, "published": published, "ours": ours,
                          "difference": diff, "tolerance": tol, "ok": abs(diff) <= tol + 1e-12})
    for measure, expected in (table.get("provenance") or {}).items():
        column = by_measure.get(measure)
        if column is None:
            mismatches.append({"measure": measure, "key": "measure", "published": "evaluated", "ours": "not evaluated"})
            continue
        ours = provenance[column]
        if "sha256" in expected:
            hashes = [f["sha256"] for f in ours.get("files", {}).values()]
            if not any(h.startswith(str(expected["sha256"]).lower()) for h in hashes):
                mismatches.append({"measure": measure, "key": "sha256", "published": expected["sha256"],
                                   "ours": ", ".join(h[:12] for h in hashes) or "no weight file"})
        for key, value in (expected.get("options") or {}).items():
            if ours["options"].get(key, "(not set)") != value:
                mismatches.append({"measure": measure, "key": f"options.{key}", "published": value,
                                   "ours": ours["options"].get(key, "(not set)")})
    for key, value in (table.get("settings") or {}).items():
        if config.get(key, "(not set)") != value:
            mismatches.append({"measure": "-", "key": key, "published": value, "ours": config.get(key, "(not set)")})
    ok = all(c["ok"] for c in cells) and not mismatches
    return {"source": table.get("source", ""), "ok": ok, "cells": cells, "provenance": mismatches}


def check_markdown(check: dict[str, Any], path: str) -> str:
    """The check as markdown: a verdict line, the cells, and any provenance mismatch."""
    n_ok = sum(c["ok"] for c in check["cells"])
    verdict = "REPRODUCED" if check["ok"] else "NOT REPRODUCED"
    lines = [f"## Check against {path}" + (f" ({check['source']})" if check["source"] else ""), "",
             f"{verdict}: {n_ok} of {len(check['cells'])} cells within tolerance, "
             f"{len(check['provenance'])} provenance mismatches.", "",
             "| method | measure | published | ours | difference | tolerance | within |", "|---|---|---|---|---|---|---|"]
    for c in check["cells"]:
        ours = "-" if c["ours"] is None else f"{c['ours']:.4g}"
        diff = c.get("why", "-") if c["difference"] is None else f"{c['difference']:+.4g}"
        lines.append(f"| {c['method']} | {c['measure']} | {c['published']:.4g} | {ours} | {diff} | {c['tolerance']:.4g} | "
                     f"{'yes' if c['ok'] else 'NO'} |")
    if check["provenance"]:
        lines += ["", "| measure | setting | published | ours |", "|---|---|---|---|"]
        lines += [f"| {m['measure']} | {m['key']} | {m['published']} | {m['ours']} |" for m in check["provenance"]]
    return "\n".join(lines)


__all__ = ["check_markdown", "check_published", "read_published"]
