"""`facereward report`: one self-contained HTML page for training runs and evaluate outputs.

Reads only what the commands wrote (RUN/metrics.json and RUN/config.yaml of train-base, train-frm, refl and
lrpo; OUT/results.json, results.md and grid.png of evaluate), so it works on finished, stopped and copied runs.
Plots are drawn with matplotlib and, like the grids, embedded as PNG data URIs: the page needs no network and
no files beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

class ReportError(ValueError):
    """A folder the report cannot read (named in the message)."""


@dataclass
class ReportSource:
    """One folder on the page: what wrote it, its title and its parsed files."""

    kind: str
    path: Path
    title: str
    metrics: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def lrpo_epochs(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """An LRPO metrics.json's per-epoch rows (its train_log; "epochs" in files written before the shared shape)."""
    return metrics.get("train_log", metrics.get("epochs", []))


def detect_kind(folder: Path) -> str | None:
    """What wrote `folder` ("evaluate", "refl", "lrpo", "train-base", "train-frm"), or None if none of them did."""
    if (folder / "results.json").is_file():
        return "evaluate"
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = _read_json(path)
    if metrics.get("unit") == "epoch" or "epochs" in metrics:  # "epochs": written before metrics.json had one shape
        return "lrpo"
    if "held_out" in metrics or any(k.startswith("refl/") for row in metrics.get("train_log", []) for k in row):
        return "refl"
    if "best_held_out_accuracy" in metrics or "history" in metrics:
        return "train-frm"
    if "train_log" in metrics:
        return "train-base"
    return None


KIND_TITLES = {"evaluate": "Evaluation", "refl": "ReFL training run", "lrpo": "LRPO training run",
               "train-base": "Base training run", "train-frm": "FRM training run"}
_NOT_RUNS = {"outputs", "checkpoints", "model", "frm", "logs", "lq", "hq", "source-hq"}  # never hold a run


def find_runs(folder: Path) -> list[tuple[Path, str]]:
    """(folder, kind) for `folder` if a command wrote it, then for every such folder below it, depth first by name.

    Training runs are not searched further (their checkpoints are not runs); evaluate outputs are (demo_out/ holds
    its training runs under runs/).
    """
    kind = detect_kind(folder)
    found = [(folder, kind)] if kind else []
    if kind not in (None, "evaluate"):
        return found
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _NOT_RUNS):
        found += find_runs(sub)
    return found


def load_sources(paths: list[str | Path]) -> list[ReportSource]:
    """The runs and evaluate outputs in and below each path (`find_runs`), in order; a ReportError if a path has none."""
    sources: list[ReportSource] = []
    for raw in paths:
        folder = Path(raw)
        if not folder.is_dir():
            raise ReportError(f"{folder}: no such folder")
        found = find_runs(folder)
        if not found:
            raise ReportError(f"{folder}: neither a training run (metrics.json) nor an evaluate output (results.json), "
                              f"and no such folder inside")
        for sub, kind in found:
            name = "results.json" if kind == "evaluate" else "metrics.json"
            config = sub / "config.yaml"
            sources.append(ReportSource(kind, sub, f"{KIND_TITLES[kind]}: {sub}", _read_json(sub / name),
                                        config.read_text() if config.is_file() else ""))
    return sources


# ---- plots -----------------------------------------------------------------------------------------------------


def _series(rows: list[dict[str, Any]], x_key: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and x_key in row:
            xs.append(float(row[x_key]))
            ys.append(float(value))
    return xs, ys


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_curves(rows: list[dict[str, Any]], x_key: str, groups: list[tuple[str, list[str]]],
                alarms: list[float] | None = None) -> str | None:
    """A row of panels, one per (title, keys) group with any data, each key a line against `x_key`; a PNG data URI.

    Steps where the reward-hacking alarm fired are drawn as red dashed lines. None when no group has data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [(k, *_series(rows, x_key, k)) for k in keys]) for title, keys in groups]
    panels = [(title, [s for s in lines if s[1]]) for title, lines in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for key, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=key)
        for x in alarms or []:
            ax.axvline(x, color="red", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _keys(rows: list[dict[str, Any]], match) -> list[str]:
    return [k for k in dict.fromkeys(k for row in rows for k in row) if match(k)]


def training_plots(source: ReportSource) -> list[tuple[str, str]]:
    """(caption, PNG data URI) per figure of a training run: reward and parts, losses, held-out fidelity, FRMs."""
    m, kind = source.metrics, source.kind
    plots: list[tuple[str, str | None]] = []
    if kind == "lrpo":
        rows = lrpo_epochs(m)
        alarms = [r["epoch"] for r in m.get("held_out", rows) if r.get("alarms")]
        plots.append(("Training reward and its parts per epoch", plot_curves(rows, "epoch", [
            ("reward", ["reward"]), ("reward parts", _keys(rows, lambda k: k.startswith("reward/")))], alarms)))
        counts = ("optimizer_steps", "grad_norm")  # on their own scales
        plots.append(("PPO statistics per epoch", plot_curves(rows, "epoch", [
            ("ppo", _keys(rows, lambda k: k.startswith("ppo/") and not k.endswith(counts))),
            ("gradient norm", _keys(rows, lambda k: k.startswith("ppo/") and k.endswith("grad_norm"))),
            ("advantages", _keys(rows, lambda k: k.startswith("adv/")))])))
        plots.append(("Held-out fidelity", plot_curves(rows, "epoch", [
            ("PSNR", ["held_out/psnr"]), ("SSIM", ["held_out/ssim"]), ("IDS", ["held_out/ids"])], alarms)))
        plots.append(("Held-out reward and its parts (frozen judges: LRPO's FRM does not train)", plot_curves(rows, "epoch", [
            ("reward", ["held_out/reward"]), ("reward parts", _keys(rows, lambda k: k.startswith("held_out/reward/"))),
            ("FRM", _keys(rows, lambda k: k.startswith("held_out/frm")))], alarms)))
    elif kind == "refl":
        log, held = m.get("train_log", []), m.get("held_out", [])
        alarms = [r["step"] for r in held if r.get("alarms")]
        plots.append(("Training losses and reward per logged step", plot_curves(log, "step", [
            ("reward", _keys(log, lambda k: "reward" in k)),
            ("losses", _keys(log, lambda k: k.endswith("loss") and "reward" not in k)),
            ("other", _keys(log, lambda k: k != "step" and "reward" not in k and not k.endswith("loss")))], alarms)))
        plots.append(("Held-out fidelity", plot_curves(held, "step", [
            ("PSNR", ["psnr"]), ("SSIM", ["ssim"]), ("IDS", ["ids"])], alarms)))
        plots.append(("Initial vs live FRM on held-out faces (reward hacking shows as the two parting)",
                      plot_curves(held, "step", [("FRM", _keys(held, lambda k: k.startswith("frm/")))], alarms)))
    elif kind == "train-base":
        log = m.get("train_log", [])
        plots.append(("Training loss", plot_curves(log, "step", [("loss", _keys(log, lambda k: k.endswith("loss")))])))
    elif kind == "train-frm":
        hist = m.get("history", [])
        plots.append(("FRM training", plot_curves(hist, "step", [
            ("held-out accuracy", ["accuracy"]), ("loss", _keys(hist, lambda k: "loss" in k))])))
    return [(caption, uri) for caption, uri in plots if uri]


def reward_per_compute(runs: list[tuple[str, list[dict[str, Any]]]], key: str = "held_out/reward"):
    """LRPO runs' held-out `key` against their training wall-clock (`time/train_s`; the epoch-0 baseline at 0), one
    line per (label, epoch rows); a matplotlib figure, or None when no run has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for label, rows in runs:
        rows = [{**r, "time/train_s": r.get("time/train_s", 0.0 if r.get("epoch") == 0 else None)} for r in rows]
        xs, ys = _series([r for r in rows if r["time/train_s"] is not None], "time/train_s", key)
        if len(xs) > 1:
            lines.append((label, xs, ys))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("training wall-clock (s), held-out evaluation excluded")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _comparison(sources: list[ReportSource]) -> str:
    runs = [(s.title, lrpo_epochs(s.metrics)) for s in sources if s.kind == "lrpo"]
    fig = reward_per_compute(runs) if len(runs) > 1 else None
    if fig is None:
        return ""
    return ('<section id="compare"><h2>Reward per compute</h2>'
            + _figure(_png(fig), "Held-out reward of the LRPO runs against their training wall-clock",
                      "held-out reward against wall-clock") + "</section>")


# ---- the page ------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    from facereward.evaluate.outputs import format_value

    return format_value(value)


def html_table(rows: dict[str, dict[str, Any]], intervals: dict[str, dict[str, list[float]]] | None = None) -> str:
    """{row: {column: value}} as an HTML table (the evaluate table's formatting: 4 decimals up to 1, else 2), each cell
    with its interval "mean [lower, upper]" where `intervals` has one."""
    from facereward.evaluate.outputs import format_cell

    intervals = intervals or {}
    columns = list(dict.fromkeys(c for values in rows.values() for c in values))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(name: str, c: str) -> str:
        value, interval = rows[name].get(c, float("nan")), intervals.get(name, {}).get(c)
        return html.escape(format_cell(value, interval)) if interval and isinstance(value, (int, float)) else _fmt(value)
    body = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{cell(name, c)}</td>" for c in columns) + "</tr>"
                   for name in rows)
    return f'<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _analysis_html(metrics: dict[str, Any]) -> str:
    """evaluate's paired comparisons, worst slices and published-table check, where the run has them."""
    parts = []
    level = metrics.get("config", {}).get("ci_level", 0.95) * 100
    if metrics.get("comparisons"):
        rows = {f"{c['a']} - {c['b']}: {c['column']}": {
            "difference": f"{c['difference']:+.4g}", f"{level:g}% interval": f"[{c['lower']:+.4g}, {c['upper']:+.4g}]",
            "p (bootstrap)": f"{c['p_bootstrap']:.3g}", "p (Wilcoxon)": "-" if c["p_wilcoxon"] != c["p_wilcoxon"]
            else f"{c['p_wilcoxon']:.3g}", "better": c["better"] or "neither"} for c in metrics["comparisons"]}
        parts.append("<h3>Paired comparisons</h3>" + html_table(rows))
    for attr, by_method in (metrics.get("slices") or {}).get("worst", {}).items():
        rows = {method: {column: f"{w['value']} ({_fmt(w['mean'])}, n={w['n']})" for column, w in by_column.items()}
                for method, by_column in by_method.items()}
        parts.append(f"<h3>Worst {html.escape(attr)} group per method</h3>" + html_table(rows))
    check = metrics.get("check")
    if check:
        n_ok = sum(c["ok"] for c in check["cells"])
        verdict = "reproduces" if check["ok"] else "does not reproduce"
        parts.append(f'<p class="{"note" if check["ok"] else "alarm"}">The run {verdict} the published table '
                     f'{html.escape(check.get("source") or "")}: {n_ok} of {len(check["cells"])} cells within tolerance, '
                     f'{len(check["provenance"])} provenance mismatches.</p>')
    return "\n".join(parts)


def _image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure(uri: str, caption: str, alt: str) -> str:
    return (f'<figure><img class="plot" src="{uri}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _config_block(text: str, label: str = "config.yaml") -> str:
    if not text:
        return ""
    return f"<details><summary>{html.escape(label)}</summary><pre>{html.escape(text)}</pre></details>"


def _alarm_lines(source: ReportSource) -> list[str]:
    rows = source.metrics.get("held_out", source.metrics.get("epochs", []))
    x_key = "epoch" if source.kind == "lrpo" else "step"
    return [f"{x_key} {r.get(x_key)}: {', '.join(r['alarms'])}" for r in rows if r.get("alarms")]


def _section(source: ReportSource, index: int) -> str:
    parts = [f'<section id="s{index}"><h2>{html.escape(source.title)}</h2>']
    if source.kind == "evaluate":
        md = source.path / "results.md"
        header = md.read_text().split("\n\n", 1)[0] if md.is_file() else ""
        if header:
            parts.append(f'<p class="note">{html.escape(header)}</p>')
        parts.append(html_table(source.metrics.get("rows", {}), source.metrics.get("intervals")))
        parts.append(_analysis_html(source.metrics))
        grid = source.path / "grid.png"
        if grid.is_file():
            parts.append(_figure(_image_uri(grid), "Before/after: LQ, each method, GT (a row per image)", "grid"))
        config = source.metrics.get("config")
        if config:
            parts.append(_config_block(json.dumps(config, indent=1), "evaluate config"))
    else:
        alarms = _alarm_lines(source)
        if alarms:
            parts.append('<p class="alarm">reward-hacking alarm fired at ' + html.escape("; ".join(alarms)) + "</p>")
        for caption, uri in training_plots(source):
            parts.append(_figure(uri, caption, caption))
        parts.append(_config_block(source.config_text))
    parts.append("</section>")
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
thead th { background: #f3f3f3; }
tbody th { text-align: left; }
img { max-width: 100%; image-rendering: pixelated; }
figure { margin: 1em 0; }
figcaption { font-size: 13px; color: #555; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
.alarm { color: #b00; font-weight: bold; }
.note { font-size: 13px; color: #555; }
"""


def build_report(paths: list[str | Path], out: str | Path, title: str = "facereward report", intro: str = "") -> Path:
    """Write one HTML page for the runs and evaluate outputs in `paths` (see `load_sources`); returns its path."""
    from facereward.atomic import atomic_write_text

    sources = load_sources(paths)
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sources))
    sections = "\n".join(_section(s, i) for i, s in enumerate(sources)) + _comparison(sources)
    intro_html = f"<p>{html.escape(intro)}</p>" if intro else ""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{intro_html}<ul>{toc}</ul>\n"
            f"{sections}\n</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
