"""`imgvae report RUN_DIR`: one self-contained HTML page per run.

Charts are inline SVG and pictures are referenced relative to the run folder,
so the page needs no network and no plotting library, and moves with the folder.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from imgvae import rundir
from imgvae.config.prior_sections import PRIOR_CONFIGS
from imgvae.evaluation.results import Metrics

SERIES_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def metric_rows(metrics: Metrics) -> list[tuple[str, str]]:
    """(label, value) rows summarising the metrics: the printed table and the report's."""
    rows = [("images", f"{metrics.images} from {', '.join(metrics.sources)}")]
    if metrics.preprocessing is not None:
        rows.append(("views", describe_views(metrics.preprocessing)))
    ref = metrics.samples_reference
    if ref is not None and not ref["held_out"]:
        rows.append(("samples scored against", f"{ref['images']} images from {', '.join(ref['sources'])}"))
    rows += [row for part in metrics.sections() for row in part.rows()]
    return rows + (metrics.generation.rows(metrics.discrete) if metrics.generation else [])


def describe_views(p: dict) -> str:
    """metrics.json's preprocessing record in words."""
    views = p["eval_views_per_image"]
    if p["crop"] == "random":
        lo, hi = p["crop_scale"]
        crop = f"{views} random square crops of {lo:.0%}-{hi:.0%} of the shorter side"
    else:
        crop = f"{'one centre crop' if views == 1 else f'{views} centre crops'} of min({p['crop_size']}, shorter side)"
    return f"{crop} per image, resized to {p['image_size']} px"


def format_table(metrics: Metrics) -> str:
    """The printed summary of the metrics."""
    rows = metric_rows(metrics)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade between lo > 0 and hi."""
    ticks = [m * 10**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return [t for t in inside if t == 10 ** round(math.log10(t))] if len(inside) > 6 else inside


def _fmt(v: float) -> str:
    a = abs(v)
    if a >= 1e5 or 0 < a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.0f}" if a >= 100 else f"{v:.3g}"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, width: int = 420,
               height: int = 240) -> str:
    """An inline SVG line chart; series: name -> [(x, y)], non-finite points dropped.
    The y axis turns logarithmic when the values are positive and span more than 20x
    (a first-epoch KL spike would flatten everything else)."""
    series = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    left, right, top, bottom = 62, 12, 26, 34
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>']
    if not series:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(out)
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 1e-9, y1 + abs(y1) * 0.1 + 1e-9
    log_y = y0 > 0 and y1 / y0 > 20
    scale = math.log10 if log_y else (lambda v: v)
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (scale(y) - scale(y0)) / (scale(y1) - scale(y0))) * ph

    if log_y:
        out.append(f'<text x="{left + 4}" y="{top + 12}" class="axisnote">log scale</text>')
    for t in (_log_ticks(y0, y1) if log_y else _ticks(y0, y1)):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="gridline"/>'
                   f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for i, (name, points) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        if len(points) < 30:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
        out.append(f'<text x="{left + pw - 4}" y="{top + 14 + 14 * i}" text-anchor="end" fill="{colour}">'
                   f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def kl_chart(kl_per_dim: list[float], variances: list[float], threshold: float, width: int = 860,
             height: int = 220) -> str:
    """Bars of KL per latent dimension, sorted, coloured by active (Cov_x E[z|x] > threshold)."""
    order = sorted(range(len(kl_per_dim)), key=lambda i: -kl_per_dim[i])
    left, top, bottom = 48, 24, 30
    pw, ph = width - left - 10, height - top - bottom
    peak = max(max(kl_per_dim), 1e-9)
    bar = pw / len(order)
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">KL per latent dimension (nats, sorted); '
           f'blue = active, grey = collapsed</text>']
    for t in _ticks(0, peak):
        y = top + (1 - t / peak) * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="gridline"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for rank, i in enumerate(order):
        h = kl_per_dim[i] / peak * ph
        colour = "#1f77b4" if variances[i] > threshold else "#bbbbbb"
        out.append(f'<rect x="{left + rank * bar:.2f}" y="{top + ph - h:.2f}" width="{max(bar - 0.5, 0.5):.2f}" '
                   f'height="{h:.2f}" fill="{colour}"><title>dim {i}: KL {kl_per_dim[i]:.3f}, '
                   f'Var E[z|x] {variances[i]:.3g}</title></rect>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">latent dimensions, by KL</text></svg>')
    return "".join(out)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _metrics_section(values: dict | None) -> str:
    if values is None:
        return "<p>No metrics.json in this run yet: run <code>imgvae evaluate RUN_DIR</code>.</p>"
    metrics = Metrics.from_dict(values)
    rec, lik, lat, dist = metrics.reconstruction, metrics.likelihood, metrics.latent, metrics.distribution
    notes = ". ".join(html.escape(n) for n in (rec.note, lik.discretisation, dist.note))
    notes = f"<p class='note'>{notes}.</p>"
    return _table(metric_rows(metrics)) + notes + kl_chart(lat.kl_per_dim, lat.posterior_mean_var, lat.active_threshold)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 3px 12px 3px 0; vertical-align: top; }
th { font-weight: 600; color: #444; } .note { color: #666; font-size: 13px; max-width: 900px; }
.chart { margin: 4px 8px 8px 0; font-size: 11px; } .chart .title { font-size: 13px; font-weight: 600; }
.gridline { stroke: #eee; } .axisnote { fill: #888; } .frame { fill: none; stroke: #999; }
.grids td { text-align: center; } .grids img { width: 220px; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
table.compare td { text-align: right; padding-right: 16px; } table.compare td.best { font-weight: 700; color: #1f6f2f; }
#reconstructions img, #samples img, #worst img { max-width: 100%; image-rendering: pixelated; }
"""


def html_page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A self-contained page in the report's style: sections are (id, heading, inner HTML)."""
    body = "".join(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{inner}</section>\n'
                   for sid, heading, inner in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{body}</body></html>
"""


def _curves(history: list[dict], steps: list[dict]) -> str:
    def epoch_series(key):
        return [(r["epoch"], r[key]) for r in history if key in r]

    titles = {"loss": "loss (negative ELBO up to a constant)", "recon": "reconstruction term", "kl": "KL term"}
    charts = []
    for part, title in titles.items():
        series = {"train (steps)": [(s["epoch_float"], s[part]) for s in steps if part in s]} if steps else {}
        series["train (epoch mean)"] = epoch_series(f"train/{part}")
        series["eval"] = epoch_series(f"eval/{part}")
        charts.append(line_chart(title, series, "epoch"))
    charts.append(line_chart("learning rate", {"lr": epoch_series("lr")}, "epoch"))
    charts.append(line_chart("training speed (img/s)", {"img/s": epoch_series("img_per_s")}, "epoch"))
    return "".join(charts)


def _grids(run: Path, history: list[dict]) -> str:
    rows = []
    for r in history:
        paths = [(kind, rundir.epoch_grid(run, r["epoch"], kind)) for kind in rundir.GRID_KINDS]
        cells = "".join(f'<td><img src="{path.relative_to(run).as_posix()}" alt="{kind} epoch {r["epoch"]}"></td>'
                        for kind, path in paths if path.is_file())
        if cells:
            rows.append(f"<tr><th>epoch {r['epoch']}</th>{cells}</tr>")
    head = "<tr><th></th><th>ground truth</th><th>reconstructions</th><th>prior samples</th></tr>"
    grids = f'<table class="grids">{head}{"".join(rows)}</table>' if rows else "<p>No picture grids yet.</p>"
    titles = [section.title for section in PRIOR_CONFIGS.values()]
    for what in [t for title in titles for t in (title, f"{title} by label")]:
        name = rundir.prior_grid(what)
        if (run / rundir.GRIDS / name).is_file():
            grids += (f'<h3>Samples from the {what} (final weights)</h3><table class="grids"><tr><td>'
                      f'<img src="{rundir.GRIDS}/{name}" alt="samples from the {what}"></td></tr></table>')
    return grids


def _facts(run: Path, summary: dict, history: list[dict]) -> list[tuple[str, str]]:
    facts = [("run folder", str(run.resolve()))]
    if summary:
        facts += [("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
                  ("parameters", f"{summary['parameters']:,}"), ("device", summary["device"]),
                  ("unreadable files skipped", str(summary["skipped_files"]))]
    if history:
        facts += [(f"final {k}", f"{v:.4g}") for k, v in history[-1].items() if "/" in k]
    return facts


def build_report(run_dir: str | Path) -> str:
    """The HTML text of run_dir's report."""
    run = Path(run_dir)
    if not rundir.is_run(run):
        raise FileNotFoundError(f"{run} is not a run folder (no {rundir.CONFIG})")
    history = rundir.read_jsonl(run / rundir.HISTORY)
    summary = rundir.read_json(run / rundir.SUMMARY) or {}
    return html_page(f"imgvae report: {run.resolve().name}", [
        ("summary", "Summary", _table(_facts(run, summary, history))),
        ("curves", "Training curves", _curves(history, rundir.read_jsonl(run / rundir.STEPS))),
        ("metrics", "Evaluation metrics and latent health", _metrics_section(rundir.read_json(run / rundir.METRICS))),
        ("grids", "Pictures by epoch", _grids(run, history)),
        ("config", "Configuration", f"<pre>{html.escape((run / rundir.CONFIG).read_text())}</pre>"),
    ])


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html and return its path."""
    path = Path(run_dir) / rundir.REPORT
    rundir.write_text_atomic(path, build_report(run_dir))
    return path


# The comparison's rows: label, the value in a model's compare.json entry, which way is better.
