"""``DIR/index.html``: the report page, and what it needs next to it (``assets/``, ``media/``).

The page loads nothing from the network: plotly.min.js is written once to ``assets/`` from the
installed plotly package and referenced by a relative ``<script src>``, every figure is an inline
JSON block drawn by ``assets/report.js``, and the runs' media files are linked (hard link, else
copied) into ``media/<run>/``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from mmtrain.report.analysis import Importance, Spread, describe_values
from mmtrain.report.assets import CSS, JS
from mmtrain.report.figures import Context, Panel
from mmtrain.report.runs import SEED_KEY, RunData

# The panels a finding may link to, with their titles (mmtrain.diagnostics.PANELS).
PANEL_TITLES = {"loss": "Loss curves", "components": "Loss components", "latent": "Latent space",
                "gradients": "Gradients", "hardware": "Hardware", "lr": "Learning-rate schedule",
                "captions": "Caption quality", "throughput": "Throughput"}


@dataclass
class FigureEntry:
    """A figure on the page: ``id`` is its element id (and PNG name), ``figure`` the plotly dict."""

    id: str
    title: str
    figure: dict[str, Any]
    png: str | None = None  # path relative to DIR, once written


@dataclass
class ReportData:
    """Everything the page shows, computed by mmtrain.report.build_report."""

    inputs: list[str]
    ctx: Context
    order: list[int]  # run indices, best final validation loss first
    params: list[str]
    importance: list[Importance]
    importance_note: str | None
    verdict: str
    seed_noise: float
    group_spreads: dict[int, Spread]
    panels: list[Panel]
    panel_figures: dict[str, FigureEntry]
    analysis_figures: dict[str, FigureEntry]
    max_points: int
    generated: str
    files: list[str] = field(default_factory=list)  # written into DIR, relative paths (for the manifest)


def slug(text: str) -> str:
    """A name safe in a path and an HTML id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "run"


def run_slugs(runs: Sequence[RunData]) -> list[str]:
    slugs, seen = [], set()
    for run in runs:
        s = base = slug(run.name)
        k = 2
        while s in seen:
            s, k = f"{base}-{k}", k + 1
        seen.add(s)
        slugs.append(s)
    return slugs


def _num(value: Any, digits: int = 4) -> str:
    """A table cell: the number shortened, its full value kept for sorting."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num" data-sort=""></td>'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{escape(str(value))}</td>"
    text = f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"
    return f'<td class="num" data-sort="{value!r}">{text}</td>'


def _text(value: Any) -> str:
    return f"<td>{escape('' if value is None else str(value))}</td>"


def _script_json(data: Any) -> str:
    """JSON safe inside <script>: no '</' that could close the element, and no NaN (JSON has none)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


# ----------------------------------------------------------------------------------------------- media

def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``: a hard link (instant, no extra space) where the filesystem allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _media_file(run: RunData, rel: str, out: Path, run_slug: str, written: list[str]) -> str | None:
    """Bring one media file of ``run`` into ``DIR/media/<run>/``; its path relative to DIR, or None when
    it is missing or would lie outside the run folder (a reference in metrics.jsonl is not trusted)."""
    src = (run.path / rel).resolve()
    root = run.path.resolve()
    if root not in src.parents or not src.is_file():
        return None
    inner = src.relative_to(root)
    parts = inner.parts[1:] if inner.parts and inner.parts[0] == "media" else inner.parts
    rel_out = Path("media", run_slug, *parts)
    link_or_copy(src, out / rel_out)
    written.append(rel_out.as_posix())
    return rel_out.as_posix()


LAZY = "\x00lazy\x00"  # where a frame's images say loading="lazy": all frames but the one shown first


def _stepper(frames: Sequence[tuple[str, str]], what: str) -> str:
    """A slider over ``frames`` [(label, html)], showing the last one first. Only that frame's images
    load with the page; the others when the slider shows them (a long run has hundreds of grids)."""
    if not frames:
        return ""
    last = len(frames) - 1
    lazy = ' loading="lazy"'
    items = "".join(f'<div class="frame" data-label="{escape(label)}"{"" if k == last else " hidden"}>'
                    f'{body.replace(LAZY, "" if k == last else lazy)}</div>'
                    for k, (label, body) in enumerate(frames))
    return (f'<div class="stepper"><label>{escape(what)} <input type="range" min="0" max="{len(frames) - 1}" '
            f'value="{len(frames) - 1}" aria-label="{escape(what)}"></label><span class="frame-label"></span>'
            f"{items}</div>")


def _caption_table(run: RunData, rel: str, out: Path, run_slug: str, written: list[str]) -> str | None:
    """A logged caption table (image, ground truth, generated) as HTML; mismatches marked."""
    path = (run.path / rel).resolve()
    if run.path.resolve() not in path.parents:
        return None
    try:
        table = json.loads(path.read_text())
        columns, rows = list(table["columns"]), list(table["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        truth = row[columns.index("ground_truth")] if "ground_truth" in columns else None
        for c, value in zip(columns, row, strict=False):
            if isinstance(value, dict) and value.get("_type") == "image-file":
                src = _media_file(run, str(value.get("path")), out, run_slug, written)
                cells.append(f'<td><img src="{escape(src)}" alt=""{LAZY}></td>' if src else "<td>–</td>")
            else:
                cls = ' class="mismatch"' if c == "generated" and truth is not None and value != truth else ""
                cells.append(f"<td{cls}>{escape(str(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="captions"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def media_section(data: ReportData, out: Path, slugs: Sequence[str]) -> str:
    """Per run: the reconstruction grids over time and the caption tables over epochs, each on a slider."""
    runs = data.ctx.runs
    parts = []
    open_runs = set(data.order[:3]) if len(runs) > 4 else set(range(len(runs)))
    for i in data.order:
        run, run_slug = runs[i], slugs[i]
        blocks = []
        for key, refs in sorted(run.media.items()):
            images, tables = [], []
            for step, rel in refs:
                if rel.endswith(".table.json"):
                    html = _caption_table(run, rel, out, run_slug, data.files)
                    if html:
                        tables.append((f"step {step}", html))
                else:
                    src = _media_file(run, rel, out, run_slug, data.files)
                    if src:
                        images.append((f"step {step}", f'<img class="grid" src="{escape(src)}" alt="{escape(key)} '
                                                         f'at step {step}"{LAZY}>'))
            name = key.removeprefix("media/")
            if images:
                blocks.append(f"<h3>{escape(name)}: {len(images)} grids (originals / reconstructions / |difference|)"
                              f"</h3>{_stepper(images, 'step')}")
            if tables:
                blocks.append(f"<h3>{escape(name)}: ground truth vs generated ({len(tables)} tables)</h3>"
                              f"{_stepper(tables, 'step')}")
        if not blocks:
            blocks.append('<p class="note">No media logged (wandb.media_samples 0, or the run has not reached '
                          "wandb.image_log_frequency / an epoch end yet).</p>")
        parts.append(f'<details id="media-{run_slug}"{" open" if i in open_runs else ""}><summary>'
                     f"{escape(run.name)}</summary>{''.join(blocks)}</details>")
    return ("<section id=\"media\"><h2>Media</h2><p class=\"look-for\">Reconstruction grids over time and the caption "
            "tables (ground truth vs greedy generated caption; differing captions in colour). Drag a slider to "
            f"step through time.</p>{''.join(parts)}</section>")


# ----------------------------------------------------------------------------------------------- sections

def _figure(entry: FigureEntry) -> str:
    png = f' <a class="png-link" href="{escape(entry.png)}">PNG</a>' if entry.png else ""
    return (f'<div class="figure" id="{escape(entry.id)}" data-figure="data-{escape(entry.id)}"></div>'
            f'<script type="application/json" id="data-{escape(entry.id)}">{_script_json(entry.figure)}</script>'
            f"{png}")


def findings_section(data: ReportData, slugs: Sequence[str]) -> str:
    """All findings: a count per rule over the runs, then each run's list with evidence and panel link."""
    runs = data.ctx.runs
    by_rule: dict[tuple[str, str, str], list[str]] = {}
    for run in runs:
        for f in run.findings:
            by_rule.setdefault((str(f.get("rule")), str(f.get("severity")), str(f.get("panel"))), []).append(run.name)
    total = sum(len(r.findings) for r in runs)
    if by_rule:
        rows = "".join(
            f'<tr><td><span class="badge {escape(sev)}">{escape(sev)}</span></td><td>{escape(rule)}</td>'
            f'<td class="num" data-sort="{len(names)}">{len(names)} of {len(runs)}</td>'
            f'<td>{escape(", ".join(names[:8]))}{" ..." if len(names) > 8 else ""}</td>'
            f'<td><a href="#panel-{escape(panel)}">{escape(PANEL_TITLES.get(panel, panel))}</a></td></tr>'
            for (rule, sev, panel), names in sorted(by_rule.items(), key=lambda kv: (kv[0][1] != "warning", kv[0][0])))
        summary = ('<table class="sortable" id="findings-table"><thead><tr><th>severity</th><th>rule</th><th>runs</th>'
                   f"<th>which</th><th>panel</th></tr></thead><tbody>{rows}</tbody></table>")
    else:
        summary = '<p>No rule fired on any run.</p>'
    sources = {r.findings_source for r in runs}
    note = ("Recomputed from metrics.jsonl and config.yaml with mmtrain.diagnostics (the rules training applies; "
            "each run's own thresholds from its diagnostics section).")
    if sources != {"diagnose_run"}:
        note += (" For runs marked so, the diagnostics module was not available and the findings are those "
                 "summary.json recorded during training.")
    per_run = []
    open_all = len(runs) <= 10
    for i in data.order:
        run = runs[i]
        items = []
        if run.diagnostics_error:
            items.append(f'<p class="note">The diagnostics failed on this run: {escape(run.diagnostics_error)}</p>')
        if run.findings_source == "summary.json":
            items.append('<p class="note">(findings recorded in summary.json during training)</p>')
        for f in run.findings:
            sev, panel = str(f.get("severity", "info")), str(f.get("panel", "loss"))
            evidence = ", ".join(f"<code>{escape(str(k))} = {escape(_short(v))}</code>"
                                 for k, v in (f.get("evidence") or {}).items())
            items.append(
                f'<div class="finding"><span class="badge {escape(sev)}">{escape(sev)}</span> '
                f'<b>{escape(str(f.get("rule")))}</b> at step {escape(str(f.get("step")))}: '
                f'{escape(str(f.get("message", "")))} <a href="#panel-{escape(panel)}">→ '
                f"{escape(PANEL_TITLES.get(panel, panel))}</a>"
                f'<div class="evidence">{evidence}</div></div>')
        if not run.findings and not run.diagnostics_error:
            items.append('<p class="note">No findings.</p>')
        warn = sum(f.get("severity") == "warning" for f in run.findings)
        per_run.append(f'<details id="findings-{slugs[i]}"{" open" if open_all and run.findings else ""}>'
                       f"<summary>{escape(run.name)}: {warn} warning(s), {len(run.findings) - warn} info</summary>"
                       f"{''.join(items)}</details>")
    listing = "".join(per_run)
    if not open_all:  # a long sweep's list scrolls in its own box instead of pushing the page down
        listing = f'<div class="scroll">{listing}</div>'
    return (f'<section id="findings"><h2>Findings ({total})</h2><p class="look-for">{note}</p>{summary}'
            f"<h3>Per run, best first</h3>{listing}</section>")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ranked_section(data: ReportData, slugs: Sequence[str]) -> str:
    """The runs ranked by final validation loss, sortable by any column."""
    runs = data.ctx.runs
    show_groups = any(len(g) > 1 for g in data.ctx.groups)
    metric_cols = [("val/train ratio", "val_train_loss_ratio"), ("val caption acc", "val/caption_accuracy"),
                   ("val i2t R@1", "val/i2t_R@1"), ("val t2i R@1", "val/t2i_R@1")]
    head = ["#", "run", "status"] + (["seed group"] if show_groups else []) + data.params + [
        SEED_KEY, "final val loss", "best val loss", "best epoch", "final train loss"] + [
        name for name, _ in metric_cols] + ["steps", "samples/s", "findings"]
    rows = []
    for rank, i in enumerate(data.order, start=1):
        run = runs[i]
        warn = sum(f.get("severity") == "warning" for f in run.findings)
        cells = [_num(rank), f'<td><a href="#findings-{slugs[i]}">{escape(run.name)}</a></td>', _text(run.status)]
        if show_groups:
            cells.append(_text(data.ctx.group_labels[data.ctx.group_of[i]]))
        cells += [_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _text(v)
                  for v in (run.flat.get(p) for p in data.params)]
        cells += [_num(run.flat.get(SEED_KEY)), _num(run.final_val_loss, 5),
                  _num(_float(run.summary.get("best_validation_loss")), 5),
                  _num(run.summary.get("best_validation_epoch")), _num(run.final_train_loss, 5)]
        cells += [_num(run.last.get(key)) for _, key in metric_cols]
        sps = run.summary.get("samples_per_second", run.last.get("samples_per_second"))
        cells += [_num(run.last_step), _num(_float(sps), 4),
                  f'<td class="num" data-sort="{warn * 1000 + len(run.findings)}">'
                  f'<a href="#findings-{slugs[i]}">{warn} W / {len(run.findings) - warn} I</a></td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    heads = "".join(f"<th>{escape(h)}</th>" for h in head)
    return ('<section id="ranking"><h2>Runs, ranked by final validation loss</h2><p class="look-for">Click a column '
            "head to sort by it. Final validation loss: summary.json's, or the last val/total_loss of a run in "
            "progress; metric columns hold the last logged value.</p>"
            f'<div class="scroll"><table class="sortable" id="ranked-runs"><thead><tr>{heads}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def seeds_section(data: ReportData) -> str:
    """Same config, different seeds: each group's spread of the final validation loss."""
    ctx = data.ctx
    groups = [(g, m) for g, m in enumerate(ctx.groups) if len(m) > 1]
    if not groups:
        body = ('<p>No two runs share a config, so there is no seed-to-seed spread to show. Run a config with '
                "several <code>--train.seed</code> values to see how much of a difference is noise.</p>")
    else:
        rows = []
        for g, members in groups:
            s = data.group_spreads[g]
            seeds = ", ".join(str(ctx.runs[i].flat.get(SEED_KEY)) for i in members)
            rows.append(f"<tr>{_text(ctx.group_labels[g])}{_num(s.n)}{_text(seeds)}{_num(s.mean, 5)}{_num(s.std, 3)}"
                        f"{_num(s.var, 3)}{_num(s.min, 5)}{_num(s.max, 5)}{_num(s.cv, 3)}</tr>")
        noise = (f"<p>Pooled seed-to-seed std of the final validation loss: <b>{data.seed_noise:.4g}</b>. A "
                 "difference between configs smaller than about twice this is within seed noise.</p>"
                 if math.isfinite(data.seed_noise) else "")
        body = ('<p class="look-for">Runs whose configs differ only in train.seed (output folders, names and other '
                "bookkeeping fields aside) are one group. In the metric panels each group is drawn as its mean ± "
                "sample std; its seeds are in the legend, hidden until clicked.</p>"
                '<table class="sortable" id="seed-groups"><thead><tr><th>config</th><th>seeds (n)</th><th>seed values'
                "</th><th>final val loss mean</th><th>std</th><th>variance</th><th>min</th><th>max</th>"
                f"<th>std / mean</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{noise}")
    fig = data.analysis_figures.get("fig-seeds")
    return (f'<section id="seeds"><h2>Compare runs: same config, different seeds?</h2>{body}'
            f"{_figure(fig) if fig else ''}</section>")


def hyperparameter_section(data: ReportData) -> str:
    """Importance table, scatter per parameter, parallel coordinates."""
    ctx = data.ctx
    if not data.params:
        only_seed = len({r.flat.get(SEED_KEY) for r in ctx.runs}) > 1
        text = ("Only the seed varies across these runs: see the seed spread above." if only_seed else
                "Every run has the same config; there is no parameter to analyse.")
        return f'<section id="hyperparameters"><h2>Hyperparameter analysis</h2><p>{escape(text)}</p></section>'
    rows = []
    for row in data.importance:
        values = [r.flat.get(row.param) for r in ctx.runs]
        corr_kind = "r" if row.correlation_kind == "pearson" else "η"
        rows.append(f"<tr>{_text(row.param)}{_text(row.kind)}{_text(describe_values(values))}"
                    f"{_num(row.correlation, 3)}{_text(corr_kind)}{_num(row.importance, 3)}{_num(row.n)}</tr>")
    note = (f'<p class="note">Random forest not fitted: {escape(data.importance_note)}.</p>'
            if data.importance_note else "")
    table = ('<table class="sortable" id="importance"><thead><tr><th>parameter</th><th>kind</th><th>values</th>'
             "<th>correlation with final val loss</th><th></th><th>random-forest importance</th><th>runs</th>"
             "</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    how = ("Correlation: Pearson's r between the parameter (log10 of it when its values span more than a factor of "
           "10, as the scatter draws it) and the final validation loss; for a category of more than two values the "
           "correlation ratio η. Importance: a random forest (scikit-learn, 200 trees, fixed seed) predicts the final "
           "validation loss from all varying parameters; each parameter's share of the forest's impurity decrease "
           "(sums to 1). This is what W&B's parameter-importance panel shows. Runs without a final validation loss "
           "are left out; seeds count as separate runs (their spread is the noise the forest must see through).")
    figs = "".join(_figure(data.analysis_figures[k]) for k in ("fig-importance", "fig-hyperparameters",
                                                                 "fig-parallel") if k in data.analysis_figures)
    return (f'<section id="hyperparameters"><h2>Hyperparameter analysis</h2><p class="verdict">{escape(data.verdict)}'
            f'</p>{table}{note}<p class="note">{escape(how)}</p>{figs}</section>')


def panel_section(panel: Panel, entry: FigureEntry) -> str:
    return (f'<section class="panel" id="panel-{escape(panel.key)}"><h2>{escape(panel.title)}</h2>'
            f'<p class="look-for">{escape(panel.look_for)}</p>{_figure(entry)}</section>')


def write_page(out: Path, data: ReportData) -> Path:
    """Write index.html, assets/ and media/ into ``out``; returns the page's path."""
    import plotly
    import plotly.offline

    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    (assets / "report.css").write_text(CSS)
    (assets / "report.js").write_text(JS)
    data.files += ["assets/plotly.min.js", "assets/report.css", "assets/report.js"]
    runs = data.ctx.runs
    slugs = run_slugs(runs)
    in_progress = sum(r.status == "in progress" for r in runs)
    records = sum(r.n_records for r in runs)
    exports = [("history.csv", "every logged value, long format: run, step, metric, value"),
               ("summary.csv", "one row per run: its config and final metrics")]
    pngs = [e for e in [*data.panel_figures.values(), *data.analysis_figures.values()] if e.png]
    export_html = "".join(f'<li><a href="{escape(f)}">{escape(f)}</a>: {escape(what)}</li>' for f, what in exports)
    if pngs:
        export_html += "<li>PNG per panel: " + ", ".join(
            f'<a href="{escape(e.png)}">{escape(e.id.removeprefix("panel-").removeprefix("fig-"))}</a>'
            for e in pngs) + "</li>"
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in [
        ("findings", "Findings"), ("ranking", "Ranked runs"), ("seeds", "Seeds"),
        ("hyperparameters", "Hyperparameters"), *[(f"panel-{p.key}", p.title) for p in data.panels],
        ("media", "Media"), ("exports", "Exports")])
    inputs = ", ".join(data.inputs)
    body = [
        f"<header><h1>mmtrain report: {len(runs)} run{'s' * (len(runs) != 1)}</h1>"
        f"<p>{escape(inputs)} · {records:,} logged steps · {in_progress} in progress · "
        f"generated {escape(data.generated)}</p></header>",
        f"<nav>{nav}</nav><main>",
        '<section id="about"><h2>About these runs</h2><p class="note">Charts draw at most '
        f"{data.max_points:,} points per line (fewer per line when a chart holds many runs): each stretch of a long "
        "history keeps its first, last, lowest and highest value, so spikes stay visible. history.csv holds every "
        "value. Click a legend entry to hide or show a run in that panel; double-click to show it alone. Findings "
        "are marked ✕ on the first chart of their panel.</p></section>",
        findings_section(data, slugs),
        ranked_section(data, slugs),
        seeds_section(data),
        hyperparameter_section(data),
        *[panel_section(p, data.panel_figures[p.key]) for p in data.panels],
        media_section(data, out, slugs),
        f'<section id="exports"><h2>Exports</h2><ul>{export_html}</ul></section>',
        "</main>",
    ]
    html = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>mmtrain report: {len(runs)} runs</title>"
            '<link rel="icon" href="data:,">'  # no favicon request
            '<link rel="stylesheet" href="assets/report.css">'
            '<script src="assets/plotly.min.js"></script><script src="assets/report.js"></script>'
            f"</head><body>{''.join(body)}</body></html>\n")
    page = out / "index.html"
    page.write_text(html)
    data.files.append("index.html")
    return page
