"""The figures that compare runs: the seed spread, final validation loss against each varying parameter
(seeds as error bars), parallel coordinates, and the parameter-importance bars. Plain plotly dicts,
as in :mod:`mmtrain.report.figures`, whose layout helpers they use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmtrain.report.analysis import Encoded, encode, spread
from mmtrain.report.figures import Context, axis_key, axis_ref, subplot_layout, svg_text, typed
from mmtrain.report.runs import SEED_KEY


def seeds_figure(ctx: Context) -> dict[str, Any] | None:
    """Final validation loss of every seed of each config that has several: the seeds as points, the
    mean ± sample std as a bar. None when no config has two seeds."""
    groups = [(g, m) for g, m in enumerate(ctx.groups) if len(m) > 1]
    if not groups:
        return None
    data = []
    for g, members in groups:
        label = svg_text(ctx.group_labels[g])
        color = ctx.run_color[members[0]]
        finals = [ctx.runs[i].final_val_loss for i in members]
        s = spread(finals)
        data.append({"type": "scatter", "mode": "markers", "x": [label] * len(members),
                     "y": [v if v is not None else None for v in finals], "name": label, "legendgroup": label,
                     "text": [svg_text(f"{ctx.runs[i].name} (seed {ctx.runs[i].flat.get(SEED_KEY)})") for i in members],
                     "marker": {"color": color, "size": 8, "opacity": 0.7},
                     "hovertemplate": "%{text}<br>final val loss %{y:.5g}<extra></extra>"})
        if s.n:
            data.append({"type": "scatter", "mode": "markers", "x": [label], "y": [s.mean], "name": label,
                         "legendgroup": label, "showlegend": False,
                         "error_y": {"type": "data", "array": [0.0 if math.isnan(s.std) else s.std], "visible": True,
                                     "color": color},
                         "marker": {"color": color, "size": 14, "symbol": "line-ew-open", "line": {"width": 3}},
                         "hovertemplate": f"mean {s.mean:.5g} ± {s.std:.3g} (n={s.n})<extra></extra>"})
    layout = subplot_layout(["final validation loss per seed; bar: mean ± sample std"], cols=1, row_height=360)
    layout["xaxis"]["type"] = "category"
    layout["yaxis"]["title"] = {"text": "final validation loss"}
    return {"data": data, "layout": layout}


def _param_axis(enc: Encoded) -> dict[str, Any]:
    if enc.kind == "log":
        return {"type": "log"}
    if enc.kind == "categorical":
        return {"type": "category", "categoryorder": "array", "categoryarray": list(enc.labels)}
    return {}


def hyperparameter_figure(ctx: Context, params: Sequence[str], target_runs: Sequence[int]) -> dict[str, Any] | None:
    """Final validation loss against each varying parameter: every run a small point, each config's
    seeds as their mean ± sample std (the error bar is the seed spread)."""
    if not params or not target_runs:
        return None
    cols = 3 if len(params) > 4 else min(2, len(params))
    layout = subplot_layout([f"final validation loss vs {p}" for p in params], cols=cols, row_height=320,
                            showlegend=False)
    data = []
    for c, param in enumerate(params):
        x_ref, y_ref = axis_ref(c)
        values = [ctx.runs[i].flat.get(param) for i in target_runs]
        enc = encode(values)
        xs = list(enc.labels[int(v)] for v in enc.values) if enc.kind == "categorical" else enc.values
        data.append({
            "type": "scatter", "mode": "markers", "x": xs if isinstance(xs, list) else typed(xs),
            "y": typed(np.asarray([ctx.runs[i].final_val_loss for i in target_runs], dtype=np.float64)),
            "text": [svg_text(f"{ctx.runs[i].name} (seed {ctx.runs[i].flat.get(SEED_KEY)})") for i in target_runs],
            "marker": {"color": [ctx.run_color[i] for i in target_runs], "size": 6, "opacity": 0.6},
            "hovertemplate": f"%{{text}}<br>{param} = %{{x}}<br>final val loss %{{y:.5g}}<extra></extra>",
            "xaxis": x_ref, "yaxis": y_ref, "name": "runs"})
        by_group: dict[int, list[int]] = {}
        for i in target_runs:
            by_group.setdefault(ctx.group_of[i], []).append(i)
        gx, gy, ge, gt = [], [], [], []
        for g, members in by_group.items():
            if len(members) < 2:
                continue
            s = spread([ctx.runs[i].final_val_loss for i in members])
            v = ctx.runs[members[0]].flat.get(param)
            gx.append(str(v) if enc.kind == "categorical" else v)
            gy.append(s.mean)
            ge.append(0.0 if math.isnan(s.std) else s.std)
            gt.append(svg_text(f"{ctx.group_labels[g]}: mean {s.mean:.5g} ± {s.std:.3g}"))
        if gx:
            data.append({"type": "scatter", "mode": "markers", "x": gx, "y": gy, "text": gt,
                         "error_y": {"type": "data", "array": ge, "visible": True, "color": "#222"},
                         "marker": {"color": "#222", "size": 10, "symbol": "diamond-open", "line": {"width": 2}},
                         "hovertemplate": "%{text}<extra>seeds</extra>", "xaxis": x_ref, "yaxis": y_ref,
                         "name": "seed mean ± std"})
        layout[axis_key(c, "x")].update(_param_axis(enc))
        layout[axis_key(c, "x")]["title"] = {"text": param, "font": {"size": 10}}
        layout[axis_key(c, "y")]["title"] = {"text": "final val loss", "font": {"size": 10}}
    layout["hovermode"] = "closest"
    return {"data": data, "layout": layout}


def parallel_figure(ctx: Context, params: Sequence[str], target_runs: Sequence[int]) -> dict[str, Any] | None:
    """Parallel coordinates: one axis per varying parameter (log10 for a log parameter, codes named by
    their values for a category) and the final validation loss, each run a line coloured by that loss."""
    if not params or len(target_runs) < 2:
        return None
    losses = np.asarray([ctx.runs[i].final_val_loss for i in target_runs], dtype=np.float64)
    dims = []
    for param in params:
        enc = encode([ctx.runs[i].flat.get(param) for i in target_runs])
        dim: dict[str, Any] = {"label": f"log10({param})" if enc.kind == "log" else param,
                               "values": [float(v) for v in enc.drawn]}
        if enc.kind == "categorical":
            dim["tickvals"] = list(range(len(enc.labels)))
            dim["ticktext"] = list(enc.labels)
        dims.append(dim)
    dims.append({"label": "final val loss", "values": [float(v) for v in losses]})
    data = [{"type": "parcoords", "dimensions": dims,
             "line": {"color": [float(v) for v in losses], "colorscale": "Viridis", "reversescale": True,
                      "showscale": True, "colorbar": {"title": {"text": "final val loss"}}}}]
    layout = {"height": 420, "margin": {"l": 80, "r": 80, "t": 60, "b": 30}, "paper_bgcolor": "white",
              "font": {"size": 11}}
    return {"data": data, "layout": layout}


def importance_figure(rows: Sequence[Any]) -> dict[str, Any] | None:
    """The importance table as bars: random-forest importance and |correlation| per parameter."""
    if not rows:
        return None
    names = [r.param for r in rows][::-1]
    imp = [r.importance if math.isfinite(r.importance) else 0.0 for r in rows][::-1]
    corr = [abs(r.correlation) if math.isfinite(r.correlation) else 0.0 for r in rows][::-1]
    data = [
        {"type": "bar", "orientation": "h", "y": names, "x": imp, "name": "random-forest importance",
         "marker": {"color": "#636EFA"}},
        {"type": "bar", "orientation": "h", "y": names, "x": corr, "name": "|correlation| (η for categories)",
         "marker": {"color": "#EF553B"}},
    ]
    layout = subplot_layout(["parameter importance for the final validation loss"], cols=1,
                            row_height=max(220, 40 * len(rows) + 80), barmode="group")
    layout["xaxis"]["range"] = [0, 1]
    return {"data": data, "layout": layout}
