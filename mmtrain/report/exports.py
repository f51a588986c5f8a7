"""The report's files for other tools: ``summary.csv`` (a row per run), the PNG per panel, and the
manifest that lets a later report into the same folder replace exactly what this one wrote.

history.csv is written while the runs are read (mmtrain.report.runs.history_rows), where the parsed
lines are at hand.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmtrain.report.runs import RunData

HISTORY_HEADER = "run,step,metric,value\n"
MANIFEST = ".mmtrain-report.json"


def write_summary_csv(path: Path, runs: Sequence[RunData], group_of: dict[int, int], group_labels: Sequence[str]
                      ) -> None:
    """One row per run: run, path, status, seed group, steps; every config field (dotted names); every
    summary.json value (``summary/<name>``; the findings list as counts); the last logged value of every
    numeric metric (``last/<metric>``)."""
    config_keys = sorted({k for r in runs for k in r.flat}, key=lambda k: (k.split(".")[0], k))
    summary_keys = sorted({k for r in runs for k in r.summary if k != "findings"})
    metric_keys = sorted({k for r in runs for k in r.last})
    header = (["run", "path", "status", "seed_group", "records", "last_step", "final_validation_loss",
               "findings_warning", "findings_info", "findings_rules"]
              + config_keys + [f"summary/{k}" for k in summary_keys] + [f"last/{k}" for k in metric_keys])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, r in enumerate(runs):
            warn = sum(x.get("severity") == "warning" for x in r.findings)
            writer.writerow(
                [r.name, str(r.path), r.status, group_labels[group_of[i]], r.n_records, r.last_step,
                 _cell(r.final_val_loss), warn, len(r.findings) - warn,
                 ";".join(str(x.get("rule")) for x in r.findings)]
                + [_cell(r.flat.get(k)) for k in config_keys] + [_cell(r.summary.get(k)) for k in summary_keys]
                + [_cell(r.last.get(k)) for k in metric_keys])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else repr(value))
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def write_pngs(figures: Sequence[tuple[dict[str, Any], Path]], width: int = 1400) -> str | None:
    """Render each (figure, path) to PNG through kaleido and the system's Chromium, all in one kaleido
    session (one browser start for all of them; plotly.io.write_images does the same, but cannot turn
    off MathJax, which kaleido would otherwise fetch from a CDN). Legend-only traces (hidden seed
    members) are left out of a paper figure. Returns None, or one line saying why no PNG was written
    and what to install (the HTML report does not need them)."""
    if not figures:
        return None
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        return "PNGs skipped: kaleido is not installed (pip install 'kaleido>=1.0'); the HTML report is complete"
    specs = []
    for fig, path in figures:
        path.parent.mkdir(parents=True, exist_ok=True)
        paper = {"data": [t for t in fig["data"] if t.get("visible") != "legendonly"], "layout": fig["layout"]}
        specs.append({"fig": paper, "path": str(path),
                      "opts": {"format": "png", "width": width, "height": int(fig["layout"].get("height", 500)),
                               "scale": 1}})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kaleido's notes about its browser; failures are reported below
            # One tab per core: a figure renders on one core, and figures are independent.
            tabs = min(len(specs), os.cpu_count() or 1)
            kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False, "n": tabs})
    except ChromeNotFoundError:
        where = os.environ.get("BROWSER_PATH")
        return ("PNGs skipped: kaleido found no Chrome/Chromium" + (f" at BROWSER_PATH={where}" if where else "")
                + "; install one (Debian/Ubuntu: apt-get install chromium) or point BROWSER_PATH at it; "
                "the HTML report is complete without them")
    except Exception as e:  # a renderer failure must not cost the HTML report
        first = str(e).splitlines()[0] if str(e) else ""
        return f"PNGs skipped: kaleido failed ({type(e).__name__}: {first}); the HTML report is complete without them"
    missing = [str(p) for _, p in figures if not p.is_file()]
    if missing:
        return f"PNGs incomplete: kaleido wrote no {', '.join(missing[:3])}"
    return None


def read_manifest(out: Path) -> list[str]:
    """The files an earlier report wrote into ``out`` (relative paths), or [] if none."""
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def remove_previous(out: Path) -> None:
    """Remove what an earlier report wrote into ``out`` (per its manifest, never anything else), and
    the folders that leaves empty, so a report of fewer runs leaves no stale media behind."""
    root = out.resolve()
    folders = set()
    for rel in read_manifest(out):
        path = (out / rel)
        try:
            if root not in path.resolve().parents:
                continue
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            continue
        except OSError:
            continue
        folders.update(p for p in path.parents if root in p.resolve().parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def write_manifest(out: Path, files: Sequence[str]) -> None:
    (out / MANIFEST).write_text(json.dumps({"written_by": "mmtrain report", "files": sorted(set(files))}, indent=0))
