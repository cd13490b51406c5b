"""What evaluate writes and reads back: results.{md,csv,json}, grid.png, the table's cells, existing output folders."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facereward.atomic import atomic_write_text
from facereward.data.imageio import image_grid, list_images, read_image, write_image


@dataclass
class EvaluateResult:
    rows: dict[str, dict[str, float]]
    per_image: dict[str, dict[str, list[float]]]
    table: str
    out_dir: Path
    judges: dict[str, str]
    analysis: dict[str, Any] = field(default_factory=dict)  # intervals, comparisons, slices, check (when asked for)
    sections: list[str] = field(default_factory=list)  # their markdown (results.md after the table)


def format_value(v: float | None) -> str:
    """A table cell: 4 decimals up to 1, else 2 (PSNR of identical images is inf); None and NaN as "-"."""
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"


def format_cell(value: float | None, interval: list[float] | None = None) -> str:
    """A cell, with its interval as "mean [lower, upper]" when one is given."""
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return format_value(value)
    return f"{format_value(value)} [{format_value(interval[0])}, {format_value(interval[1])}]"


def markdown_table(rows: dict[str, dict[str, float]], intervals: dict[str, dict[str, list[float]]] | None = None) -> str:
    """{row: {column: value}} as a markdown table; 4 decimals up to 1, else 2; NaN as "-"; with `intervals`
    ({row: {column: [lower, upper]}}) each cell is "mean [lower, upper]"."""
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    intervals = intervals or {}
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(values.get(c), intervals.get(name, {}).get(c)) for c in columns) + " |")
    return "\n".join(lines)


def provenance_markdown(provenance: dict[str, dict], sampling: dict[str, dict]) -> str:
    """What each column was computed with (measure, options, weight files' SHA-256, judges) and each model's sampler."""
    lines = ["| column | measure | options | weight files (SHA-256) | judges |", "|---|---|---|---|---|"]
    for column, p in provenance.items():
        options = ", ".join(f"{k}={v}" for k, v in p.get("options", {}).items() if not k.endswith("path") and k != "model")
        files = ", ".join(f"{Path(f['path']).name} {f['sha256'][:16]}" for f in p.get("files", {}).values())
        judges = ", ".join(f"{k} = {v}" for k, v in p.get("judges", {}).items())
        lines.append(f"| {column} | {p.get('measure', '-')} | {options or '-'} | {files or '-'} | {judges or '-'} |")
    for method, s in sampling.items():
        lines.append(f"| (sampler of {method}) | - | " + ", ".join(f"{k}={v}" for k, v in s.items()) + " | - | - |")
    return "\n".join(lines)


class OutputFolder:
    """Existing outputs in a folder, looked up by the LQ file's stem."""

    def __init__(self, name: str, folder: str, names: list[str], size: tuple[int, int]):
        self.folder = Path(folder)
        by_stem = {p.stem: p for p in list_images(self.folder)}
        missing = [n for n in names if n not in by_stem]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{self.folder}: {len(missing)} outputs for '{name}' are missing ({shown})")
        self.paths = by_stem
        self.size = size

    def batch(self, names: list[str]) -> torch.Tensor:
        images = [read_image(self.paths[n], size=self.size) for n in names]
        return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_")


def write_outputs(config, out_dir: Path, rows, per_image, judges, table: str, grid_images, names, n_images: int,
                   sampling: dict[str, dict] | None = None, provenance: dict[str, dict] | None = None,
                   analysis: dict[str, Any] | None = None, sections: list[str] = ()) -> None:
    """results.md (header, table, `sections`, provenance), results.csv (with lower/upper columns when intervals were
    computed), results.json (everything, incl. `analysis`: intervals, comparisons, slices, check) and grid.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling, provenance, analysis = sampling or {}, provenance or {}, analysis or {}
    intervals = analysis.get("intervals") or {}
    how = "; ".join(f"{m}: " + (f"one step at t = {s['one_step_timestep']}" if "one_step_timestep" in s else
                               f"eta {s['eta']}, {s['spacing']} spacing, final alpha-bar {s['final_alpha_bar']}")
                    + (", colour fix" if s["colour_fix"] else "") for m, s in sampling.items())
    header = (f"{n_images} images from {config.testset}; {config.sample_steps} DDIM steps, seed {config.seed}"
              + (f" ({how})" if how else "") + "; judges: " + ", ".join(f"{k} = {v}" for k, v in judges.items()) + "\n\n")
    if intervals:
        header += f"Cells: mean [{config.ci_level * 100:g}% percentile-bootstrap interval over images, {config.bootstrap} " \
                  f"resamples ({config.set_bootstrap} for set measures)].\n\n"
    body = [table, *sections]
    if provenance or sampling:
        body.append("## How each column was computed\n\n" + provenance_markdown(provenance, sampling))
    atomic_write_text(out_dir / "results.md", header + "\n\n".join(body) + "\n")
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        bounds = [c for c in columns if any(c in v for v in intervals.values())]
        writer.writerow(["method", *columns, *[f"{c} {side}" for c in bounds for side in ("lower", "upper")]])
        for method, values in rows.items():
            own = intervals.get(method, {})
            writer.writerow([method, *[values.get(c, "") for c in columns],
                             *[own[c][k] if c in own else "" for c in bounds for k in (0, 1)]])
    payload = {"config": asdict(config), "judges": judges, "sampling": sampling, "provenance": provenance, "rows": rows,
               **{k: v for k, v in analysis.items() if v}, "names": names,
               "per_image": {m: dict(v) for m, v in per_image.items()}}
    atomic_write_text(out_dir / "results.json", json.dumps(payload, indent=1, default=float))
    grid = evaluation_grid(grid_images)
    if grid is not None:
        write_image(out_dir / "grid.png", grid)


def evaluation_grid(grid_images: dict[str, list[np.ndarray]]) -> np.ndarray | None:
    """evaluate's grid.png: a titled column per method (LQ first, GT last), a row per image, 2x for <= 64 px; None if empty."""
    order = ["LQ"] + [m for m in grid_images if m not in ("LQ", "GT")] + ["GT"]
    order = [m for m in order if m in grid_images]
    n_rows = min(len(v) for v in grid_images.values()) if grid_images else 0
    if not n_rows:
        return None
    return image_grid([[grid_images[m][r] for m in order] for r in range(n_rows)], column_titles=order,
                      scale=2 if grid_images[order[0]][0].shape[0] <= 64 else 1)


def redraw_grid(out_dir: str | Path, testset: str | Path | None = None) -> Path:
    """Draw OUT/grid.png of a finished evaluate run again from its files, restoring nothing; returns its path.

    Reads OUT/results.json (methods, image names, config), the test set's lq/ and hq/ (`testset`, default the
    one results.json names), OUT/outputs/METHOD/ for restorer rows (so the run must have kept save_outputs) and
    the `images` folders. The same images and columns as the run's grid, drawn by the current `image_grid`.
    """
    out_dir = Path(out_dir)
    payload = json.loads((out_dir / "results.json").read_text())
    config = payload["config"]
    testset = Path(testset or config["testset"])
    names = payload["names"][: config["grid_rows"]]
    folders = {m: testset / "lq" if m == "LQ" else Path(config["images"].get(m) or out_dir / "outputs" / slug(m))
               for m in payload["rows"]}
    if (testset / "hq").is_dir():
        folders["GT"] = testset / "hq"
    size = read_image(list_images(testset / "lq")[0]).shape[:2]
    grid_images = {m: list(OutputFolder(m, str(f), names, size).batch(names).numpy().transpose(0, 2, 3, 1))
                   for m, f in folders.items()}
    grid = evaluation_grid(grid_images)
    if grid is None:
        raise ValueError(f"{out_dir}: no images to draw")
    write_image(out_dir / "grid.png", grid)
    return out_dir / "grid.png"


__all__ = ["EvaluateResult", "OutputFolder", "evaluation_grid", "format_cell", "format_value", "markdown_table",
           "provenance_markdown", "redraw_grid", "slug", "write_outputs"]
