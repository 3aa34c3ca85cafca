"""`imgvae report RUN_DIR`: one self-contained HTML page per run.

Charts are inline SVG and pictures are referenced relative to the run folder,
so the page needs no network and no plotting library, and moves with the folder.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from . import rundir

SERIES_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows summarising a metrics dict: the printed table and the report's."""
    rec, lik, lat, dist = (metrics[k] for k in ("reconstruction", "likelihood", "latent", "distribution"))
    rows = [("images", f"{metrics['images']} from {', '.join(metrics['sources'])}")]
    if "preprocessing" in metrics:
        rows.append(("views", describe_views(metrics["preprocessing"])))
    if "samples_reference" in metrics and not metrics["samples_reference"]["held_out"]:
        ref = metrics["samples_reference"]
        rows.append(("samples scored against", f"{ref['images']} images from {', '.join(ref['sources'])}"))
    absent = {"ms_ssim": "n/a (needs >= 161 px)", "lpips": "n/a (needs eval.lpips_weights)"}
    for k in ("mse", "psnr", "ssim", "ms_ssim", "lpips"):
        v = rec.get(k)
        rows.append((k.upper().replace("_", "-"), f"{v['mean']:.4f} ± {v['std']:.4f}" if v else absent[k]))
    rows += [
        ("-ELBO nats/image", f"{lik['neg_elbo_nats']:.1f} (recon {lik['recon_nats']:.1f} + KL {lik['kl_nats']:.1f})"),
        ("-ELBO bits/dim", f"{lik['neg_elbo_bpd']:.4f}"),
        (f"-IW bound (K={lik['iw_samples']}) bits/dim",
         f"{lik['neg_iw_bpd']:.4f} ({lik['neg_iw_nats']:.1f} nats/image)"),
        ("active units", f"{lat['active_units']} / {lat['dims']} (Cov_x E[z|x] > {lat['active_threshold']})"),
    ]
    return rows + [(k, f"{v:.3f}") for k, v in dist.items() if k != "note"]


def describe_views(p: dict) -> str:
    """metrics.json's preprocessing record in words."""
    views = p["eval_views_per_image"]
    if p["crop"] == "random":
        lo, hi = p["crop_scale"]
        crop = f"{views} random square crops of {lo:.0%}-{hi:.0%} of the shorter side"
    else:
        crop = f"{'one centre crop' if views == 1 else f'{views} centre crops'} of min({p['crop_size']}, shorter side)"
    return f"{crop} per image, resized to {p['image_size']} px"


def format_table(metrics: dict) -> str:
    """The printed summary of a metrics dict."""
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


def _metrics_section(metrics: dict | None) -> str:
    if metrics is None:
        return "<p>No metrics.json in this run yet: run <code>imgvae evaluate RUN_DIR</code>.</p>"
    rec, lik, lat, dist = (metrics[k] for k in ("reconstruction", "likelihood", "latent", "distribution"))
    rows = metric_rows(metrics)
    notes = ". ".join(html.escape(n) for n in (rec["note"], lik["discretisation"], dist["note"]))
    notes = f"<p class='note'>{notes}.</p>"
    return _table(rows) + notes + kl_chart(lat["kl_per_dim"], lat["posterior_mean_var"], lat["active_threshold"])


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
    if (run / rundir.GRIDS / rundir.FITTED_PRIOR_GRID).is_file():
        grids += ('<h3>Samples from the fitted prior (final weights)</h3><table class="grids"><tr><td>'
                  f'<img src="{rundir.GRIDS}/{rundir.FITTED_PRIOR_GRID}" alt="samples from the fitted prior"></td></tr>'
                  '</table>')
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
COMPARE_ROWS = [
    ("PSNR dB", lambda m: m["metrics"]["reconstruction"]["psnr"]["mean"], "high"),
    ("SSIM", lambda m: m["metrics"]["reconstruction"]["ssim"]["mean"], "high"),
    ("MS-SSIM", lambda m: (m["metrics"]["reconstruction"]["ms_ssim"] or {}).get("mean"), "high"),
    ("LPIPS", lambda m: (m["metrics"]["reconstruction"].get("lpips") or {}).get("mean"), "low"),
    ("rFID (FID of reconstructions)", lambda m: m["metrics"]["distribution"].get("fid_recon"), "low"),
    ("fd_effnet of reconstructions", lambda m: m["metrics"]["distribution"]["fd_effnet_recon"], "low"),
    ("fd_effnet of samples, N(0, I)", lambda m: m["metrics"]["distribution"]["fd_effnet_samples"], "low"),
    ("fd_effnet of samples, fitted prior", lambda m: m["metrics"]["distribution"].get("fd_effnet_samples_fitted"),
     "low"),
    ("FID of samples", lambda m: m["metrics"]["distribution"].get("fid_samples"), "low"),
    ("-ELBO bits/dim", lambda m: m["metrics"]["likelihood"]["neg_elbo_bpd"] if m["has_likelihood"] else None, "low"),
    ("latent numbers per image", lambda m: m["latent_numbers"], None),
    ("parameters", lambda m: m["parameters"], None),
    ("encode + decode img/s (this machine)", lambda m: m["img_per_s"], "high"),
]


def compare_rows(models: list[dict]) -> list[tuple[str, list[float | None], set[int]]]:
    """(label, each model's value, the columns holding the best value); rows no model has are left out."""
    rows = []
    for label, value, better in COMPARE_ROWS:
        values = [value(m) for m in models]
        present = [v for v in values if v is not None]
        if not present:
            continue
        best = (max if better == "high" else min)(present) if better else None
        rows.append((label, values, {i for i, v in enumerate(values) if best is not None and v == best}))
    return rows


def scatter_chart(title: str, points: list[tuple[str, float, float]], xlabel: str, ylabel: str, width: int = 560,
                  height: int = 300) -> str:
    """An inline SVG scatter chart of labelled points (label, x > 0, y), x on a log scale."""
    left, right, top, bottom = 62, 24, 26, 40
    xs, ys = [math.log10(x) for _, x, _ in points], [y for _, _, y in points]
    x0, x1 = min(xs) - 0.15, max(xs) + 0.15
    y0, y1 = min(ys) - 0.5, max(ys) + 0.5
    pw, ph = width - left - right, height - top - bottom

    def px(v):
        return left + (v - x0) / (x1 - x0) * pw

    def py(v):
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="gridline"/>'
                   f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _log_ticks(10**x0, 10**x1):
        out.append(f'<text x="{px(math.log10(t)):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
               f'{html.escape(ylabel)}</text>')
    for i, (label, x, y) in enumerate(points):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        cx, cy = px(math.log10(x)), py(y)
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}"/>'
                   f'<text x="{cx + 8:.1f}" y="{cy + 4:.1f}" fill="{colour}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _compare_table(models: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(m['name'])}</th>" for m in models)
    body = []
    for label, values, best in compare_rows(models):
        cells = "".join(f'<td class="{"best" if i in best else ""}">{"—" if v is None else _number(v)}</td>'
                        for i, v in enumerate(values))
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f'<table class="compare"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _number(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def _models_table(data: dict) -> str:
    rows = []
    for m in data["models"]:
        size = f"{data['image_size']} px" + ("" if m["native_size"] == data["image_size"]
                                            else f" (made for {m['native_size']} px)")
        latent = "x".join(map(str, m["latent_shape"]))
        rows.append(f"<tr><th>{html.escape(m['name'])}</th><td>{html.escape(m['path'])} ({m['kind']})</td>"
                    f"<td>{size}</td><td>{latent}</td></tr>")
    return ("<table><tr><th>model</th><th>from</th><th>evaluated at</th><th>latent</th></tr>" + "".join(rows)
            + "</table>")


def _worst(data: dict) -> str:
    keys = data["models"][0]["per_image"]["keys"]
    # Listed without the folder all the images share.
    folder = os.path.dirname(os.path.commonprefix(keys)) if len(keys) > 1 else ""
    prefix = folder + os.sep if folder else ""
    parts = [f"<p class=\"note\">Files in {html.escape(folder)}.</p>"] if folder else []
    for m in data["models"]:
        worst = data["pictures"]["worst"][m["name"]]
        index = {key: i for i, key in enumerate(m["per_image"]["keys"])}
        items = "".join(f"<li>{html.escape(key.removeprefix(prefix))}: "
                        f"PSNR {m['per_image']['psnr'][index[key]]:.2f} dB, "
                        f"SSIM {m['per_image']['ssim'][index[key]]:.3f}</li>" for key in worst["keys"])
        parts.append(f"<h3>{html.escape(m['name'])}</h3><img src=\"{worst['file']}\" alt=\"worst images of "
                     f"{html.escape(m['name'])}\"><ol>{items}</ol>")
    return "".join(parts)


def build_compare_page(data: dict) -> str:
    """The HTML of `imgvae compare`'s compare.json."""
    models = data["models"]
    resized = [m["name"] for m in models if m["native_size"] != data["image_size"]]
    note = (f"{data['images']} images from {', '.join(data['sources'])}: {describe_views(data['preprocessing'])}; "
            "every model saw these same pixels, with the same evaluation noise. Best value per row in bold.")
    if resized:
        note += f" Evaluated at {data['image_size']} px although made for another size: {', '.join(resized)}."
    points = [(m["name"], m["latent_numbers"], m["metrics"]["reconstruction"]["psnr"]["mean"]) for m in models]
    return html_page(f"imgvae compare: {', '.join(m['name'] for m in models)}", [
        ("models", "Models", _models_table(data) + f"<p class='note'>{html.escape(note)}</p>"),
        ("metrics", "Metrics", _compare_table(models)),
        ("rate-distortion", "Rate and distortion",
         scatter_chart("PSNR against latent size", points, "latent numbers per image (log scale)", "PSNR dB")),
        ("reconstructions", "Reconstructions", f'<img src="{data["pictures"]["reconstructions"]}" '
         'alt="the same images reconstructed by every model">'),
        ("worst", "The images each model handles worst", _worst(data)),
        ("samples", "Samples", f'<img src="{data["pictures"]["samples"]}" alt="samples of every model">'),
    ])


def write_compare_page(out: str | Path, data: dict) -> Path:
    path = Path(out) / "compare.html"
    rundir.write_text_atomic(path, build_compare_page(data))
    return path
