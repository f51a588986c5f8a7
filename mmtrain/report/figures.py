"""The report's charts, as plotly figures (plain ``{"data": [...], "layout": {...}}`` dicts: building
thousands of traces through plotly's validating graph objects costs seconds on a 100-run sweep; the
dicts are what plotly.js and kaleido read anyway).

Numbers go in as plotly.js typed arrays (``{"dtype": "f4", "bdata": base64}``): a tenth of the size of
JSON number lists, and NaN (a gap in a line) needs no special case.

Every metric panel draws each run in its own colour, one legend entry per run (``legendgroup``: a
click hides or shows the run in every chart of the panel, a double click shows only it). Runs of the
same config with different seeds are drawn as their mean ± sample std (a band), and their members are
in the legend, hidden until clicked.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmtrain.report.analysis import (
    downsample_indices,
    mean_band,
    points_per_line,
)
from mmtrain.report.runs import RunData

DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
STEP_AXIS = "optimizer step"


@dataclass(frozen=True)
class Chart:
    """One subplot: ``lines`` are training-window metrics (a point per logged step), ``points`` are
    per-epoch metrics (markers at the epoch's last step); ``band`` = (low, high) metrics drawn as a
    filled band. In one chart, each metric has its own dash style, named in ``title``."""

    title: str
    lines: tuple[str, ...] = ()
    points: tuple[str, ...] = ()
    band: tuple[str, str] | None = None
    log_y: bool = False
    y_title: str = ""


@dataclass(frozen=True)
class Panel:
    """A section of the page: ``key`` is its anchor (``#panel-<key>``, the panel names findings link
    to), ``look_for`` what the guide says to look for in it."""

    key: str
    title: str
    look_for: str
    charts: tuple[Chart, ...]


RETRIEVAL = ("val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@1", "val/t2i_R@5")

PANELS: tuple[Panel, ...] = (
    Panel("loss", "Loss curves", "Loss decreasing; validation above training and a growing gap (ratio > 1 and "
          "rising) means overfitting.", (
              Chart("total_loss: train window (line), validation (markers)", ("total_loss",), ("val/total_loss",)),
              Chart("epoch averages: train (solid), validation (dash)", (),
                    ("epoch_train_loss_avg", "epoch_val_loss_avg")),
              Chart("validation / train loss ratio per epoch", (), ("val_train_loss_ratio",), y_title="ratio"),
          )),
    Panel("components", "Loss components", "Which loss dominates: if loss_caption does, the captions need work; if "
          "loss_image does, the reconstruction does.", (
              Chart("loss_image (MSE): train, validation", ("loss_image",), ("val/loss_image",)),
              Chart("loss_caption (token cross-entropy): train, validation", ("loss_caption",), ("val/loss_caption",)),
              Chart("loss_alignment (InfoNCE): train, validation", ("loss_alignment",), ("val/loss_alignment",)),
          )),
    Panel("latent", "Latent space", "latent_std should grow, then settle; latent_norm follow a smooth path; "
          "latent_mean hover around 0.", (
              Chart("latent_mean", ("latent_mean",)),
              Chart("latent_std", ("latent_std",)),
              Chart("latent_norm (mean L2 norm per sample)", ("latent_norm",)),
              Chart("latent min/max band", band=("latent_min", "latent_max")),
          )),
    Panel("gradients", "Gradients", "grad_norm should decrease smoothly: a sudden spike is an explosion, a fall "
          "towards 0 vanishing gradients. clip_fraction is how often clipping acted.", (
              Chart("grad_norm: mean pre-clip (solid), window max (dash)", ("grad_norm", "grad_norm_max"),
                    log_y=True),
              Chart("grad_max: largest |gradient element|", ("grad_max",), log_y=True),
              Chart("clip_fraction: share of steps clipped", ("clip_fraction",), y_title="share"),
          )),
    # The hardware panel's charts depend on what the runs logged (GPU or CPU, how many ranks): hardware_panel.
    Panel("hardware", "Hardware", "Aim for ~80-90% GPU memory and high utilisation; imbalance ratios near 1 "
          "(a straggler rank shows as a step-time ratio above 1).", ()),
    Panel("lr", "Learning-rate schedule", "Warmup, then cosine decay to optim.min_lr.", (
        Chart("learning_rate", ("learning_rate",), y_title="learning rate"),
    )),
    Panel("captions", "Caption quality", "caption_accuracy should rise, perplexity and entropy fall; retrieval "
          "R@k rise.", (
              Chart("caption_accuracy: train, validation", ("caption_accuracy",), ("val/caption_accuracy",)),
              Chart("caption_perplexity: train, validation", ("caption_perplexity",), ("val/caption_perplexity",),
                    log_y=True),
              Chart("caption_entropy (nats): train, validation", ("caption_entropy",), ("val/caption_entropy",)),
              Chart("retrieval: i2t R@1 (solid), i2t R@5 (dash), t2i R@1 (dot), t2i R@5 (dashdot)", (), RETRIEVAL),
          )),
    Panel("throughput", "Throughput", "samples/s steady; a data-wait share above ~10% means the input pipeline "
          "is the bottleneck.", (
              Chart("samples_per_second", ("samples_per_second",), y_title="samples/s"),
              Chart("data_wait_fraction: main process (solid), slowest rank (dash)",
                    ("data_wait_fraction", "hw/max/data_wait_fraction"), y_title="share"),
              Chart("step_time (s per optimizer step)", ("step_time",), y_title="s"),
          )),
)

HARDWARE_NAMES = ("gpu_memory_percent", "gpu_utilization", "torch_peak_mb", "rss_mb", "cpu_percent")
# Past this many (run, rank) lines per chart, the hardware panel draws the max and mean across ranks instead.
MAX_RANK_LINES = 48


def drawn_metric(key: str) -> bool:
    """Whether the charts draw ``key`` (what runs.load_run keeps as a series)."""
    if key in _DRAWN or key.startswith("hw/imbalance_"):
        return True
    return key.startswith(("hw/rank", "hw/max/", "hw/mean/")) and key.rsplit("/", 1)[-1] in HARDWARE_NAMES


_DRAWN = frozenset({m for p in PANELS for c in p.charts for m in (*c.lines, *c.points, *(c.band or ()))}
                   | set(HARDWARE_NAMES) | {"val/total_loss", "hw/max/data_wait_fraction"})


# ----------------------------------------------------------------------------------------------- units

@dataclass
class Unit:
    """What one legend entry draws: a single run, or a seed group (mean ± std of its members)."""

    label: str
    color: str
    members: list[int]
    is_group: bool


@dataclass
class Context:
    """What every figure needs to know about the runs: their drawing units, colours and labels."""

    runs: list[RunData]
    units: list[Unit]
    run_color: dict[int, str]
    group_of: dict[int, int]  # run index -> index of its seed group in ``groups``
    groups: list[list[int]]
    group_labels: list[str]
    params: list[str]
    max_points: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)


def palette(n: int) -> list[str]:
    """``n`` distinguishable colours: plotly's qualitative sets up to 24, then the Turbo scale."""
    import plotly.colors as pc

    if n <= 10:
        return list(pc.qualitative.Plotly[:n])
    if n <= 24:
        return list(pc.qualitative.Dark24[:n])
    return list(pc.sample_colorscale("Turbo", [i / (n - 1) for i in range(n)]))


def group_label(runs: Sequence[RunData], members: Sequence[int], params: Sequence[str]) -> str:
    """A seed group's name: its values of the varying parameters, and how many seeds it has."""
    flat = runs[members[0]].flat
    values = ", ".join(f"{p.rsplit('.', 1)[-1]}={_fmt(flat.get(p))}" for p in params) or "same config"
    return f"{values} ({len(members)} seeds)" if len(members) > 1 else values


def build_context(runs: list[RunData], groups: list[list[int]], params: list[str], order: Sequence[int],
                  max_points: int = 2000) -> Context:
    """Units in ``order`` (the ranking: colours follow it, so on a big sweep the colour tells the rank)."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    labels = [group_label(runs, m, params) for m in groups]
    seen, unit_members = set(), []
    for i in order:
        g = group_of[i]
        if len(groups[g]) > 1:
            if g not in seen:
                seen.add(g)
                unit_members.append((svg_text(labels[g]), groups[g], True))
        else:
            unit_members.append((svg_text(runs[i].name), [i], False))
    colors = palette(len(unit_members))
    units = [Unit(label, color, members, is_group)
             for (label, members, is_group), color in zip(unit_members, colors, strict=True)]
    run_color = {i: u.color for u in units for i in u.members}
    return Context(runs, units, run_color, group_of, groups, labels, list(params), max_points)


# ----------------------------------------------------------------------------------------------- helpers

def typed(values: np.ndarray) -> dict[str, str] | list:
    """A numeric array as a plotly.js typed array spec (base64 of its bytes)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int32) if len(arr) == 0 or (arr.min() >= -2**31 and arr.max() < 2**31) else arr.astype(
            np.float64)
    elif arr.dtype != np.float32:
        arr = arr.astype(np.float64)
    dtype = {"int32": "i4", "float32": "f4", "float64": "f8"}[str(arr.dtype)]
    return {"dtype": dtype, "bdata": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")}


def svg_text(text: str) -> str:
    """Text for a plotly label: plotly.js reads a few HTML tags in names and hover text, so a run or
    parameter value holding ``<`` or ``&`` is shown as written, never as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` or ``rgb(r, g, b)`` with an alpha."""
    if color.startswith("#"):
        r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(float(x)) for x in color[color.index("(") + 1:color.index(")")].split(",")[:3])
    return f"rgba({r},{g},{b},{alpha})"


def subplot_layout(titles: Sequence[str], cols: int = 2, row_height: int = 300, **extra: Any) -> dict[str, Any]:
    """A layout dict with one subplot per title (``cols`` per row), axis names x, x2, ... as plotly numbers them."""
    from plotly.subplots import make_subplots

    cols = max(1, min(cols, len(titles)))
    rows = max(1, math.ceil(len(titles) / cols))
    height = row_height * rows + 90
    # ~85 px between rows: room for the x-axis title above and the next subplot title below.
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles),
                        vertical_spacing=min(0.3, 85 / height) if rows > 1 else 0.1, horizontal_spacing=0.08)
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)  # 10 kB per figure, and plotly.js' own defaults look the same
    for ann in layout.get("annotations", []):
        ann["font"] = {"size": 12}
    layout.update({
        "height": height, "margin": {"l": 60, "r": 20, "t": 50, "b": 40},
        "paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"size": 11},
        "legend": {"groupclick": "togglegroup", "font": {"size": 10}},
        **extra})
    for key, value in layout.items():
        if key.startswith(("xaxis", "yaxis")) and isinstance(value, dict):
            value.update({"gridcolor": "#e6e6e6", "zerolinecolor": "#cccccc", "showline": True,
                          "linecolor": "#999999"})
    return layout


def axis_ref(i: int) -> tuple[str, str]:
    """Trace axis references of subplot ``i`` (0-based): ("x", "y"), ("x2", "y2"), ..."""
    return ("x", "y") if i == 0 else (f"x{i + 1}", f"y{i + 1}")


def axis_key(i: int, letter: str) -> str:
    return f"{letter}axis" if i == 0 else f"{letter}axis{i + 1}"


def _empty_note(layout: dict[str, Any], i: int, text: str) -> None:
    x, y = axis_ref(i)
    layout.setdefault("annotations", []).append({
        "text": text, "xref": f"{x} domain", "yref": f"{y} domain", "x": 0.5, "y": 0.5, "showarrow": False,
        "font": {"color": "#888", "size": 12}})


# ----------------------------------------------------------------------------------------------- metric panels

def hardware_panel(runs: Sequence[RunData]) -> Panel:
    """The hardware panel for what these runs logged: per-rank GPU memory and utilisation (GPU runs),
    process memory and CPU per rank, and the imbalance ratios. With more than MAX_RANK_LINES
    (run, rank) lines a chart draws the max (solid) and mean (dash) across ranks instead."""
    base = next(p for p in PANELS if p.key == "hardware")
    keys = set().union(*(r.series for r in runs)) if runs else set()
    rank_ids = {k.split("/")[1][4:] for k in keys if k.startswith("hw/rank")}
    ranks = sorted(int(r) for r in rank_ids if r.isdigit())
    per_rank = len(ranks) * len(runs) <= MAX_RANK_LINES
    titles = {
        "gpu_memory_percent": ("GPU memory % (of the device)", "%"),
        "gpu_utilization": ("GPU utilisation %", "%"),
        "torch_peak_mb": ("peak CUDA memory (MB)", "MB"),
        "rss_mb": ("process memory, RSS (MB)", "MB"),
        "cpu_percent": ("process CPU % (100 = one core)", "%"),
    }
    charts = []
    for name, (title, unit) in titles.items():
        rank_keys = tuple(f"hw/rank{r}/{name}" for r in ranks if f"hw/rank{r}/{name}" in keys)
        if rank_keys and per_rank:
            styles = ", ".join(f"rank {r} ({DASHES[i % len(DASHES)]})" for i, r in enumerate(ranks[:4]))
            more = ", ..." if len(ranks) > 4 else ""
            charts.append(Chart(f"{title} per rank: {styles}{more}", rank_keys, y_title=unit))
        elif rank_keys:
            charts.append(Chart(f"{title}: max across ranks (solid), mean (dash)",
                                (f"hw/max/{name}", f"hw/mean/{name}"), y_title=unit))
        elif name in keys:
            charts.append(Chart(f"{title} (main process)", (name,), y_title=unit))
    charts.append(Chart("imbalance across ranks, max/min: peak memory (solid), step time (dash); 1 = balanced",
                        ("hw/imbalance_peak_memory", "hw/imbalance_step_time"), y_title="ratio"))
    return Panel(base.key, base.title, base.look_for, tuple(charts))


def panels_for(runs: Sequence[RunData]) -> list[Panel]:
    """The metric panels, in the page's order, the hardware one fitted to the runs."""
    return [hardware_panel(runs) if p.key == "hardware" else p for p in PANELS]


def _unit_series(ctx: Context, unit: Unit, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(steps, values, std or None) that ``unit`` draws for ``metric``: the run's own, or its group's mean ± std."""
    parts = [ctx.runs[i].series[metric] for i in unit.members if metric in ctx.runs[i].series]
    if not parts:
        return None
    if not unit.is_group:
        steps, values = parts[0]
        return steps, values, None
    steps, mean, std, _ = mean_band(parts)
    return steps, mean.astype(np.float32), std.astype(np.float32)


def _hover(label: str, metric: str) -> str:
    label = label.replace("%{", "% {")  # a run name must not read as a template field
    return f"<b>{label}</b><br>{metric}<br>step %{{x}}<br>%{{y:.5g}}<extra></extra>"


def _unit_trace(label: str, show_legend: bool, visible: bool, x: str, y: str, metric: str,
                std: np.ndarray | None) -> dict[str, Any]:
    """What a unit's training line and its validation points share: name, legend group, axes, hover."""
    return {"type": "scatter", "name": label, "legendgroup": label, "showlegend": show_legend, "xaxis": x, "yaxis": y,
            "hovertemplate": _hover(label + (" (mean ± std)" if std is not None else ""), metric),
            **({} if visible else {"visible": "legendonly"})}


def metric_figure(ctx: Context, panel: Panel) -> dict[str, Any]:
    """One metric panel as a figure: a subplot per chart, every unit overlaid (see module doc)."""
    charts = panel.charts or (Chart("nothing logged"),)
    layout = subplot_layout([c.title for c in charts], cols=2 if len(charts) > 1 else 1)
    data: list[dict[str, Any]] = []
    legend_shown: set[str] = set()

    def legend(group: str) -> bool:
        if group in legend_shown:
            return False
        legend_shown.add(group)
        return True

    hidden_members = [(i, u) for u in ctx.units if u.is_group for i in u.members]
    for c, chart in enumerate(charts):
        x, y = axis_ref(c)
        metrics = (*chart.lines, *chart.points, *(chart.band or ()))
        # Hidden seed members count too: they are in the page, if not on screen.
        lines_in_chart = (len(ctx.units) + len(hidden_members)) * max(1, len(chart.lines) + len(chart.points))
        budget = min(ctx.max_points, points_per_line(lines_in_chart))
        drew = False
        # Units first (a seed group's mean ± std), then its members, hidden until their legend entry is clicked.
        drawers = [(u, u.label, u.color, True) for u in ctx.units] + [
            (Unit(svg_text(ctx.runs[i].name), u.color, [i], False), svg_text(ctx.runs[i].name), u.color, False)
            for i, u in hidden_members]
        for unit, label, color, visible in drawers:
            group = label
            for k, metric in enumerate(chart.lines):
                got = _unit_series(ctx, unit, metric)
                if got is None:
                    continue
                drew = True
                steps, values, std = got
                idx = downsample_indices(values, budget)
                if std is not None:
                    data.append(_band_trace(steps[idx], values[idx] - np.nan_to_num(std[idx]),
                                            values[idx] + np.nan_to_num(std[idx]), color, group, x, y))
                data.append({
                    **_unit_trace(label, legend(group), visible, x, y, metric, std), "mode": "lines",
                    "x": typed(steps[idx]), "y": typed(values[idx]),
                    "line": {"color": color, "width": 1.4 if visible else 1.0, "dash": DASHES[k % len(DASHES)]}})
            for k, metric in enumerate(chart.points):
                got = _unit_series(ctx, unit, metric)
                if got is None:
                    continue
                drew = True
                steps, values, std = got
                trace = {
                    **_unit_trace(label, legend(group), visible, x, y, metric, std), "mode": "lines+markers",
                    "x": typed(steps), "y": typed(values),
                    "line": {"color": color, "width": 1.0,
                             "dash": DASHES[(k + (1 if chart.lines else 0)) % len(DASHES)]},
                    "marker": {"color": color, "size": 6, "symbol": "circle" if k == 0 else "diamond"}}
                if std is not None:
                    trace["error_y"] = {"type": "data", "array": typed(np.nan_to_num(std)), "visible": True,
                                        "color": color, "thickness": 1}
                data.append(trace)
            if chart.band:
                low, high = (_unit_series(ctx, unit, m) for m in chart.band)
                if low is not None and high is not None and len(low[0]) == len(high[0]):
                    drew = True
                    steps = low[0]
                    idx = np.union1d(downsample_indices(low[1], budget // 2), downsample_indices(high[1], budget // 2))
                    trace = _band_trace(steps[idx], low[1][idx], high[1][idx], color, group, x, y, alpha=0.25)
                    trace.update({"name": label, "showlegend": legend(group), "hoverinfo": "skip",
                                  **({} if visible else {"visible": "legendonly"})})
                    data.append(trace)
                    for metric, series in zip(chart.band, (low, high), strict=True):
                        data.append({
                            "type": "scatter", "mode": "lines", "x": typed(steps[idx]), "y": typed(series[1][idx]),
                            "name": label, "legendgroup": group, "showlegend": False, "xaxis": x, "yaxis": y,
                            "line": {"color": color, "width": 0.8}, "hovertemplate": _hover(label, metric),
                            **({} if visible else {"visible": "legendonly"})})
        if not drew:
            _empty_note(layout, c, f"not logged by these runs ({', '.join(metrics) or 'nothing to draw'})")
        layout[axis_key(c, "x")]["title"] = {"text": STEP_AXIS, "font": {"size": 10}}
        if chart.log_y:
            layout[axis_key(c, "y")]["type"] = "log"
        if chart.y_title:
            layout[axis_key(c, "y")]["title"] = {"text": chart.y_title, "font": {"size": 10}}
    _finding_markers(ctx, panel, charts, data)
    layout["hovermode"] = "closest"
    return {"data": data, "layout": layout}


def _band_trace(steps: np.ndarray, low: np.ndarray, high: np.ndarray, color: str, group: str, x: str, y: str,
                alpha: float = 0.18) -> dict[str, Any]:
    """A filled band between ``low`` and ``high`` as one closed outline (``fill: toself``), which needs
    no neighbouring trace to fill to (``tonexty`` would, and breaks when runs are toggled)."""
    xs = np.concatenate([steps, steps[::-1]])
    ys = np.concatenate([high, low[::-1]]).astype(np.float32)
    return {"type": "scatter", "mode": "lines", "x": typed(xs), "y": typed(ys), "fill": "toself",
            "fillcolor": rgba(color, alpha), "line": {"width": 0, "color": rgba(color, 0)}, "hoverinfo": "skip",
            "legendgroup": group, "showlegend": False, "xaxis": x, "yaxis": y, "name": group}


def _finding_markers(ctx: Context, panel: Panel, charts: Sequence[Chart], data: list[dict[str, Any]]) -> None:
    """A red ✕ on the panel's first chart at the step of each finding that links to this panel."""
    chart = charts[0]
    first = (*chart.lines, *chart.points)
    xs, ys, texts = [], [], []
    for run in ctx.runs:
        for f in run.findings:
            if f.get("panel") != panel.key:
                continue
            series = next((run.series[m] for m in first if m in run.series and len(run.series[m][0])), None)
            if series is None:
                continue
            steps, values = series
            j = min(int(np.searchsorted(steps, int(f.get("step", 0)))), len(steps) - 1)
            xs.append(int(steps[j]))
            finite = values[np.isfinite(values)]
            # A value that is not finite (the spike itself, written as 1e308) is not drawn: mark the top.
            ys.append(float(values[j]) if math.isfinite(values[j]) else float(finite.max()) if len(finite) else 0.0)
            texts.append(svg_text(f"{run.name}: {f.get('rule')} at step {f.get('step')}"))
    if xs:
        data.append({"type": "scatter", "mode": "markers", "x": typed(np.asarray(xs)), "y": typed(np.asarray(ys)),
                     "name": "findings", "text": texts, "hovertemplate": "%{text}<extra>finding</extra>",
                     "marker": {"symbol": "x", "size": 11, "color": "#d62728", "line": {"width": 1}},
                     "xaxis": "x", "yaxis": "y", "legendgroup": "findings"})
