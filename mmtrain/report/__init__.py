"""``mmtrain report RUN_OR_SWEEP_DIR... --out DIR``: an offline, self-contained report of runs.

Reads each run's ``metrics.jsonl``, ``config.yaml`` and ``summary.json`` (runs in progress as they
are), and writes into DIR:

- ``index.html`` + ``assets/`` (plotly.min.js, the page's CSS and JS) + ``media/``: a page that loads
  nothing from the network, with the guide's panels (interactive plotly charts), the findings of
  mmtrain.diagnostics, a sortable ranking, seed groups as mean ± spread with their variance, and the
  hyperparameter analysis (scatter per parameter, parallel coordinates, importance table);
- ``history.csv`` (every logged number: run, step, metric, value) and ``summary.csv`` (a row per run);
- ``png/<panel>.png``: every chart as a PNG (kaleido + the system's Chromium; skipped with one
  warning line when there is none);
- ``.mmtrain-report.json``: the list of files written, so that the next report into DIR removes
  exactly those (and nothing else a user keeps there) before writing its own.

Why plotly: its charts have hover values, zoom and legend toggling built in, its JS bundle ships
inside the Python package (written next to the page, so no CDN), and the same figures render to
PNG through kaleido, so the page and the paper figures never disagree.

Modules: runs (find and read run folders), histories (one run's metrics.jsonl), analysis (pure
numbers), figures (plotly figures of the metric panels), comparison (figures comparing runs),
page (the HTML), exports (CSV, PNG, manifest), assets (CSS/JS text).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mmtrain.errors import UserError


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtrain report`` with the CLI (handler: run_report)."""
    p = sub.add_parser(
        "report", allow_abbrev=False, help="an offline HTML report (+ CSV, PNG) of runs and sweeps",
        description="Read runs' metrics.jsonl, config.yaml and summary.json (runs in progress too) and write an "
                    "offline report into DIR: index.html (interactive charts, findings, ranking, seed spread, "
                    "hyperparameter importance, media), history.csv, summary.csv and a PNG per panel.",
        epilog="examples:\n  mmtrain report runs/laptop --out report/\n"
               "  mmtrain report sweeps/lr-sweep --out sweeps/lr-sweep/report\n"
               "  mmtrain report runs/a runs/b runs/c --out compare/ --no-png\n\n"
               "DIR may exist: the report replaces its own files there (index.html, assets/, media/, png/, "
               "history.csv, summary.csv)\nand leaves every other file alone.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", metavar="RUN_OR_SWEEP_DIR", nargs="+",
                   help="run folders (holding metrics.jsonl), or folders holding runs up to 2 levels down")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the report into")
    p.add_argument("--max-points", type=int, default=2000, metavar="N",
                   help="most points a chart line draws (default 2000; the CSVs always hold everything)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG per panel (they need Chromium)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes reading runs in parallel (default: one per CPU core)")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    """The CLI handler: build the report, print where it is and how long each phase took."""
    if args.max_points < 16:
        raise UserError(f"--max-points {args.max_points}: must be at least 16")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    result = build_report(args.inputs, Path(args.out), max_points=args.max_points, png=not args.no_png,
                          workers=args.workers, warn=_warn)
    print(result.describe(), file=sys.stderr, flush=True)
    print(result.page, flush=True)
    return 0


def _warn(message: str) -> None:
    print(f"mmtrain: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class ReportResult:
    """Where the report is and what it took: ``timings`` in seconds by phase (load: reading the runs,
    writing their history.csv rows and running the diagnostics, in parallel; analysis; figures; png;
    page: HTML, assets, media, summary.csv)."""

    page: Path
    runs: int
    records: int
    timings: dict[str, float] = field(default_factory=dict)
    png_note: str | None = None
    reading: dict[str, float] = field(default_factory=dict)  # CPU seconds of the load phase, summed over runs

    def describe(self) -> str:
        total = sum(self.timings.values())
        split = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        text = f"mmtrain report: {self.runs} run(s), {self.records:,} logged steps in {total:.1f} s ({split})"
        if self.timings.get("load", 0.0) > 5:  # where a long load went (in parallel workers)
            text += "; reading, summed over runs: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.reading.items())
        return f"{text}; wrote {self.page.parent}"


def _check_out(out: Path, runs: Sequence[Path]) -> Path:
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder to write the report into")
    resolved = out.resolve()
    for run in runs:
        if run.resolve() == resolved:
            raise UserError(f"--out {str(out)!r} is one of the run folders (its media/ would mix with the run's); "
                            f"write the report elsewhere, e.g. --out {out / 'report'}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mmtrain-report.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot create or write this folder ({e.strerror or e}); "
                        "choose another --out") from None
    return out


def build_report(inputs: Sequence[str | Path], out: Path, max_points: int = 2000, png: bool = True,
                 workers: int | None = None, warn: Callable[[str], None] = _warn) -> ReportResult:
    """Build the report of the runs under ``inputs`` into ``out`` (see the module doc). Raises UserError
    for an input that does not exist or holds no run, an unreadable config.yaml, or an unusable ``out``."""
    from mmtrain.report import analysis, comparison, exports, figures, page, runs

    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - t
        t = now

    paths = runs.find_runs([str(p) for p in inputs])
    out = _check_out(Path(out), paths)
    exports.remove_previous(out)
    written: list[str] = []
    loaded = runs.load_runs(paths, keep=figures.drawn_metric, history=out / "history.csv",
                            history_header=exports.HISTORY_HEADER, workers=workers)
    written.append("history.csv")
    for run in loaded:
        if run.skipped_lines > 1 or (run.skipped_lines == 1 and run.status != "in progress"):
            warn(f"{run.path / runs.METRICS}: skipped {run.skipped_lines} line(s) that are not complete JSON records")
    lap("load")

    flats = [r.flat for r in loaded]
    params = runs.varying_params(flats)
    groups = analysis.seed_groups(flats)

    def rank_key(i: int) -> tuple[bool, float, str]:
        v = loaded[i].final_val_loss
        return (v is None, v if v is not None else math.inf, loaded[i].name)

    order = sorted(range(len(loaded)), key=rank_key)
    group_spreads = {g: analysis.spread([loaded[i].final_val_loss for i in m]) for g, m in enumerate(groups)}
    seed_noise = analysis.pooled_std([[loaded[i].final_val_loss for i in m] for m in groups])
    target_runs = [i for i in order if loaded[i].final_val_loss is not None]
    importance, why = analysis.parameter_importance(
        {p: [loaded[i].flat.get(p, runs.MISSING) for i in target_runs] for p in params},
        [loaded[i].final_val_loss for i in target_runs])
    verdict = analysis.verdict(importance, why, seed_noise)
    lap("analysis")

    ctx = figures.build_context(loaded, groups, params, order, max_points=max_points)
    panels = figures.panels_for(loaded)
    panel_figures = {p.key: page.FigureEntry(f"panel-{p.key}-figure", p.title, figures.metric_figure(ctx, p))
                     for p in panels}
    analysis_figures = {}
    for key, title, fig in [
        ("fig-seeds", "Seed spread", comparison.seeds_figure(ctx)),
        ("fig-importance", "Parameter importance", comparison.importance_figure(importance)),
        ("fig-hyperparameters", "Final validation loss vs parameters",
         comparison.hyperparameter_figure(ctx, params, target_runs)),
        ("fig-parallel", "Parallel coordinates", comparison.parallel_figure(ctx, params, target_runs)),
    ]:
        if fig is not None:
            analysis_figures[key] = page.FigureEntry(key, title, fig)
    lap("figures")

    png_note = None
    if png:
        entries = [*panel_figures.values(), *analysis_figures.values()]
        targets = [(e.figure, out / "png" / f"{e.id.removesuffix('-figure')}.png") for e in entries]
        png_note = exports.write_pngs(targets)
        if png_note is None:
            for e, (_, path) in zip(entries, targets, strict=True):
                e.png = path.relative_to(out).as_posix()
                written.append(e.png)
        else:
            warn(png_note)
    lap("png")

    data = page.ReportData(
        inputs=[str(p) for p in inputs], ctx=ctx, order=order, params=params, importance=importance,
        importance_note=why if params else None, verdict=verdict, seed_noise=seed_noise, group_spreads=group_spreads,
        panels=panels, panel_figures=panel_figures, analysis_figures=analysis_figures, max_points=max_points,
        generated=datetime.now().strftime("%Y-%m-%d %H:%M"), files=written)
    index = page.write_page(out, data)
    exports.write_summary_csv(out / "summary.csv", loaded, ctx.group_of, ctx.group_labels)
    written.append("summary.csv")
    exports.write_manifest(out, written)
    lap("page")
    reading = {name: sum(r.timings.get(key, 0.0) for r in loaded) for name, key in (
        ("JSON", "parse"), ("columns", "columns"), ("history rows", "csv"), ("diagnostics", "diagnostics"))}
    return ReportResult(index, len(loaded), sum(r.n_records for r in loaded), timings, png_note, reading)
