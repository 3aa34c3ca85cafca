"""The page `imgvae compare` writes: one metrics table (a column per model, the best of each row
in bold), PSNR against latent size, the pictures; the report's charts and style, no torch."""

from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path

from imgvae import rundir
from imgvae.evaluation.report import SERIES_COLOURS, _fmt, _log_ticks, _ticks, describe_views, html_page
from imgvae.evaluation.results import Metrics, Scores, Spread, prior_title

# What compare measures of a model itself, beside its evaluation: (label, value, which is better).
MODEL_ROWS = [
    ("latent numbers per image", lambda m: m["latent_numbers"], None),
    ("parameters", lambda m: m["parameters"], None),
    ("encode + decode img/s (this machine)", lambda m: m["img_per_s"], "high"),
]


def metric_table(models: list[dict]) -> list[tuple[str, list, str | None]]:
    """(label, each model's value, which is better) for every result field that has a "better"
    (results.metric), then each prior's generation scores and the floor's, then MODEL_ROWS."""
    metrics = [Metrics.from_dict(m["metrics"]) for m in models]
    rows = []
    for index, section in enumerate(metrics[0].sections()):
        for f in dataclasses.fields(section):
            if f.metadata.get("better"):
                values = [_value(m, type(section), f.name) for m in metrics]
                if f.name == "neg_elbo_bpd":  # a diffusers folder's decoder has no likelihood of its own
                    values = [v if m["has_likelihood"] else None for v, m in zip(values, models)]
                rows.append((f.metadata["label"], values, f.metadata["better"]))
    return rows + _generation_rows(metrics) + [(label, [value(m) for m in models], better)
                                                for label, value, better in MODEL_ROWS]


def _value(metrics: Metrics, section: type, name: str):
    """A field of a model's result section (None when the model has no such section: no codebook)."""
    part = next((p for p in metrics.sections() if isinstance(p, section)), None)
    value = None if part is None else getattr(part, name)
    return value.mean if isinstance(value, Spread) else value


def _generation_rows(metrics: list[Metrics]) -> list[tuple[str, list, str | None]]:
    """Each prior's generation scores (every prior any model has), then the reconstruction floor's."""
    gens = [m.generation for m in metrics]
    priors = dict.fromkeys(name for g in gens if g for name in g.priors)
    rows = []
    for name in priors:
        title = prior_title(name, any(m.discrete for m in metrics))
        for f in [f for f in dataclasses.fields(Scores) if "label" in f.metadata]:
            values = [getattr(g.priors[name], f.name) if g and name in g.priors else None for g in gens]
            rows.append((f"{title} samples: {f.metadata['label']}", values, f.metadata["better"]))
    if any(gens):
        rows.append(("reconstruction floor: fd_effnet vs training", [g.floor.fd_effnet if g else None for g in gens],
                     "low"))
    return rows


def compare_rows(models: list[dict]) -> list[tuple[str, list[float | None], set[int]]]:
    """(label, each model's value, the columns holding the best value); rows no model has are left out."""
    rows = []
    for label, values, better in metric_table(models):
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
    points = [(m["name"], m["latent_numbers"], Metrics.from_dict(m["metrics"]).reconstruction.psnr.mean)
              for m in models]
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
