"""How the cost of one mmtrain training step grows with batch size and with image size.

    python benchmarks/bench_growth.py --preset laptop            # batch 8-128 and 32-128 px, plot, peak RSS
    python benchmarks/bench_growth.py --preset laptop --rounds 12 --no-rss
    python benchmarks/bench_growth.py --preset tiny --batch-sizes 4 8 --image-sizes 16 32 --rounds 2 --steps 3 \\
        --no-rss --no-png                                          # smoke

Points: the preset's model and data with ``train.batch_size`` in ``--batch-sizes`` (at the preset's
image size), and ``model.image_size`` in ``--image-sizes`` (at the preset's batch size); the preset's
own point is shared by both axes. Every point is a real ``mmtrain.trainer.Trainer`` built in this
process (``wandb.telemetry false``, W&B disabled, no media, no checkpoint: the training step itself;
``benchmarks/profile_step.py`` shows what telemetry adds), trained by its own ``train_epoch``.

**Timing: interleaved blocks.** A round runs one block of ``--steps`` optimizer steps on every point,
the order reversed every round; round 0 is warm-up. A block starts a fresh pass over the data, and its
time is taken between the ends of its first and last steps (``--steps`` - 1 intervals), so the
iterator's start-up (Accelerate loads one batch ahead) is not in it. On a shared machine whole rounds
run slow, so each point's figure is drift-corrected: the median over rounds of its ratio to the
preset's own point in the same round, times that point's median ms/step; the table also has the raw
median and IQR. samples/s = batch size / step time (one process). ``--raw FILE`` writes every block's
ms/step as JSON.

**Peak RSS (``--rss``, default on).** In one process the points share the allocator and the high-water
mark, so each point's memory is measured in a process of its own, one at a time after the timing: this
script with ``--child`` builds the point's Trainer and trains ``--steps`` steps; its peak RSS is
the child's own ``VmHWM`` (interpreter, torch and the data included: compare the rows; not the
``ru_maxrss`` a parent gets from ``wait4``, which Linux floors at the parent's own peak).

**How cost grows.** Least-squares fits over each axis: log-log, ``ms/step ~ batch^a`` and
``ms/step ~ pixels^b`` (pixels = image size squared), and linear, ``ms/step = fixed + per-sample x batch``
(``a`` below 1 means a fixed per-step cost is being amortised). The plot
(``benchmarks/figures/growth_<preset>.png``, two log-log panels) is written with plotly + kaleido and the
system's Chromium, as ``mmtrain report`` writes its PNGs; without them a line says so and the table stands.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_step import (
    REPO,
    bench_overrides,
    offline_wandb_env,
    parse_sets,
    preset_path,
    watch_step_ends,
)

from mmtrain.config import Config, load_config
from mmtrain.errors import UserError
from mmtrain.report.exports import write_pngs
from mmtrain.trainer import Trainer

FIGURES = REPO / "benchmarks" / "figures"


@dataclass
class Point:
    """One (batch size, image size) configuration and its timed blocks."""

    batch: int
    image: int
    trainer: Trainer | None = None
    ms: list[float] = field(default_factory=list)  # per timed block: ms per optimizer step
    rss_mb: float | None = None
    _stamps: list[float] = field(default_factory=list)
    _epoch: int = 0

    @property
    def label(self) -> str:
        return f"batch {self.batch}, {self.image} px"

    def build(self, cfg: Config) -> None:
        self.trainer = Trainer(cfg)
        cuda = self.trainer.accelerator.device.type == "cuda"

        def stamp() -> None:
            if cuda:
                torch.cuda.synchronize()  # the step's kernels are inside its interval
            self._stamps.append(time.perf_counter())

        watch_step_ends(self.trainer, stamp)

    def block(self, steps: int, record: bool) -> None:
        """``steps`` optimizer steps from the start of a fresh pass over the data; records ms/step over
        the ``steps`` - 1 intervals between step ends when ``record``."""
        trainer = self.trainer
        self._epoch += 1
        trainer.state.epoch, trainer.state.batches_in_epoch = self._epoch, 0
        self._stamps.clear()
        trainer.train_epoch(self._epoch, stop_at=trainer.state.optimizer_step + steps)
        if len(self._stamps) != steps:
            raise RuntimeError(f"{self.label}: a block ran {len(self._stamps)} steps instead of {steps}")
        if record:
            self.ms.append(1000 * (self._stamps[-1] - self._stamps[0]) / (steps - 1))

    def median_ms(self) -> float:
        """The median of this point's own blocks (raw: the machine's drift between rounds is in it)."""
        return statistics.median(self.ms)

    def iqr_ms(self) -> tuple[float, float]:
        return quartiles(self.ms)

    def ratios(self, reference: Point) -> list[float]:
        """Per round: this point's ms/step over ``reference``'s in the same round."""
        return [a / b for a, b in zip(self.ms, reference.ms, strict=True)]

    def corrected_ms(self, reference: Point) -> float:
        """Drift-corrected ms/step: the median of the per-round ratios to ``reference`` times the
        reference's median, so a round the machine was slow for everyone moves no point."""
        return statistics.median(self.ratios(reference)) * reference.median_ms()


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def point_config(path: Path, out: Path, overrides: dict[str, Any], batch: int, image: int) -> Config:
    return load_config(path, {**bench_overrides(out, telemetry=False), **overrides,
                              "train.batch_size": batch, "model.image_size": image})


def fit_power(x: list[float], y: list[float]) -> float:
    """Exponent ``a`` of the least-squares fit ``log y = a log x + c``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line ``y = intercept + slope x``."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def growth_lines(batch_axis: list[Point], image_axis: list[Point], reference: Point) -> list[str]:
    """The fitted exponents and lines over the drift-corrected ms/step, one sentence per axis (an axis of
    one point has none)."""
    lines = []
    if len(batch_axis) >= 2:
        b = [float(p.batch) for p in batch_axis]
        ms = [p.corrected_ms(reference) for p in batch_axis]
        fixed, per_sample = fit_line(b, ms)
        lines.append(f"batch size ({batch_axis[0].image} px): time/step ~ batch^{fit_power(b, ms):.2f} (log-log fit, "
                     f"batch {b[0]:g}-{b[-1]:g}); linear fit {fixed:.1f} ms fixed + {per_sample:.3f} ms per sample")
    if len(image_axis) >= 2:
        px = [float(p.image**2) for p in image_axis]
        ms = [p.corrected_ms(reference) for p in image_axis]
        fixed, per_kpx = fit_line([x / 1000 for x in px], ms)
        lines.append(f"image size (batch {image_axis[0].batch}): time/step ~ pixels^{fit_power(px, ms):.2f} "
                     f"(= side^{2 * fit_power(px, ms):.2f}, {image_axis[0].image}-{image_axis[-1].image} px); "
                     f"linear fit {fixed:.1f} ms fixed + {per_kpx:.3f} ms per 1000 pixels of image side^2")
    return lines


def markdown_table(batch_axis: list[Point], image_axis: list[Point], reference: Point) -> str:
    """Both axes' points as markdown rows: drift-corrected ms/step (see :meth:`Point.corrected_ms`), the
    ratio to ``reference`` with its IQR over rounds, samples/s, the raw median and IQR, the peak RSS."""
    ref = f"batch {reference.batch}, {reference.image} px"
    lines = [f"| axis | batch | image px | ms/step | x {ref} (IQR) | samples/s | raw ms/step (IQR) | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for axis, points in (("batch size", batch_axis), ("image size", image_axis)):
        for p in points:
            ms, (lo, hi) = p.corrected_ms(reference), p.iqr_ms()
            r_lo, r_hi = quartiles(p.ratios(reference))
            rss = f"{p.rss_mb:.0f}" if p.rss_mb is not None else "-"
            lines.append(f"| {axis} | {p.batch} | {p.image} | {ms:.1f} "
                         f"| {statistics.median(p.ratios(reference)):.2f} ({r_lo:.2f}-{r_hi:.2f}) "
                         f"| {1000 * p.batch / ms:.1f} | {p.median_ms():.1f} ({lo:.1f}-{hi:.1f}) | {rss} |")
    return "\n".join(lines)


def growth_figure(batch_axis: list[Point], image_axis: list[Point], reference: Point, title: str) -> dict[str, Any]:
    """A plotly figure (plain dict): drift-corrected ms/step against batch size and against image size,
    log-log, the IQR of the per-round ratios (times the reference's median) as error bars."""
    def trace(points: list[Point], x: list[float], axis: str, name: str) -> dict[str, Any]:
        ms = [p.corrected_ms(reference) for p in points]
        spread = [tuple(r * reference.median_ms() for r in quartiles(p.ratios(reference))) for p in points]
        return {"type": "scatter", "mode": "lines+markers", "name": name, "x": x, "y": ms,
                "xaxis": f"x{axis}", "yaxis": f"y{axis}", "showlegend": False,
                "error_y": {"type": "data", "symmetric": False,
                            "array": [max(0.0, hi - m) for (_, hi), m in zip(spread, ms, strict=True)],
                            "arrayminus": [max(0.0, m - lo) for (lo, _), m in zip(spread, ms, strict=True)]}}

    def axis_titles(i: str, x: str, domain: list[float], values: list[float]) -> dict[str, Any]:
        return {f"xaxis{i}": {"type": "log", "title": {"text": x}, "domain": domain, "anchor": f"y{i}",
                              "tickvals": values, "ticktext": [f"{v:g}" for v in values]},
                f"yaxis{i}": {"type": "log", "title": {"text": "ms per optimizer step"}, "anchor": f"x{i}"}}

    def proportional(points: list[Point], x: list[float], power: float, axis: str, name: str) -> dict[str, Any]:
        # Cost proportional to the work (batch, or side^2), through the first point: the line a step
        # with no fixed cost would follow. Above it at the small end = a fixed per-step cost amortised.
        y0 = points[0].corrected_ms(reference)
        return {"type": "scatter", "mode": "lines", "name": name, "x": x, "y": [y0 * (v / x[0]) ** power for v in x],
                "xaxis": f"x{axis}", "yaxis": f"y{axis}", "line": {"dash": "dot", "color": "#999"},
                "showlegend": axis == ""}

    data, layout = [], {"height": 450, "title": {"text": title}, "margin": {"t": 90},
                        "plot_bgcolor": "white", "paper_bgcolor": "white",
                        "legend": {"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.2}}
    if batch_axis:
        x = [float(p.batch) for p in batch_axis]
        data += [trace(batch_axis, x, "", "batch"), proportional(batch_axis, x, 1.0, "", "proportional to the work")]
        layout.update(axis_titles("", f"batch size ({batch_axis[0].image} px)", [0.0, 0.45], x))
    if image_axis:
        x = [float(p.image) for p in image_axis]
        data += [trace(image_axis, x, "2", "image"), proportional(image_axis, x, 2.0, "2", "proportional")]
        layout.update(axis_titles("2", f"image size, px per side (batch {image_axis[0].batch})", [0.55, 1.0], x))
    for key in [k for k in layout if k.startswith(("xaxis", "yaxis"))]:
        layout[key].update({"gridcolor": "#ddd", "linecolor": "#444", "showline": True})
    return {"data": data, "layout": layout}


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB: ``VmHWM`` of /proc/self/status (Linux), else ``ru_maxrss``.

    Not the ``ru_maxrss`` that ``wait4`` returns to a parent: Linux carries the parent's high-water mark
    into a child started by fork/vfork + exec, so every child of a large parent reports at least the
    parent's peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


CHILD_RSS = "peak RSS MB: "


def child_rss_mb(argv: list[str], batch: int, image: int) -> float:
    """Peak RSS (MB) of a separate process that builds the point's Trainer and trains its steps (the
    child reports its own, see :func:`peak_rss_mb`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(batch), str(image)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(CHILD_RSS)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the memory run for batch {batch}, {image} px failed:\n{done.stderr[-2000:]}")
    return float(lines[-1].removeprefix(CHILD_RSS))


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv), measure, print the markdown table and fits, write the plot.
    Returns the exit code: 0, or 2 after one line for a bad option, preset or config value."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="laptop", help="configs/<preset>.yaml, or a YAML path (laptop)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64, 96, 128],
                        help="pixels per side; each must be divisible by 2**model.image_encoder_layers")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of one block per point; the first is "
                                                              "warm-up (8)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per block, >= 2 (6)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a config override for every point, e.g. --set train.channels_last=true")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                        help="measure each point's peak RSS in a process of its own (default on)")
    parser.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                        help="write the plot (default on)")
    parser.add_argument("--figure-dir", type=Path, default=FIGURES, help="where growth_<preset>.png goes")
    parser.add_argument("--raw", type=Path, help="also write every block's ms/step per point to this JSON file")
    parser.add_argument("--child", type=int, nargs=2, metavar=("BATCH", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 2:
        parser.error("--rounds and --steps must be >= 2 (one warm-up round; a block's time is between step ends)")
    if min(args.batch_sizes + args.image_sizes) < 1:
        parser.error("--batch-sizes and --image-sizes must be positive")
    try:
        return measure(args, sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"bench_growth: {e}", file=sys.stderr)
        return 2


def time_points(path: Path, overrides: dict[str, Any], keys: list[tuple[int, int]], rounds: int, steps: int,
                tmp: Path) -> tuple[dict[tuple[int, int], Point], str]:
    """Build a Trainer per (batch, image) key and time them in interleaved rounds. Returns the points
    (their trainers closed and dropped) and the precision trained in. UserError when a point's training
    split has fewer than ``steps`` batches."""
    points = {k: Point(*k) for k in keys}
    try:
        for (b, s), p in points.items():
            print(f"building {p.label}", flush=True)
            p.build(point_config(path, tmp / f"b{b}-px{s}", overrides, b, s))
            if len(p.trainer.train_loader) < steps:
                raise UserError(f"--steps {steps}: at batch {b} the training split has only "
                                f"{len(p.trainer.train_loader)} batches; lower --steps or --batch-sizes, or raise "
                                "--set data.synthetic_train_size=N")
        order, start = list(points.values()), time.perf_counter()
        for r in range(rounds):
            for p in order if r % 2 == 0 else reversed(order):
                p.block(steps, record=r > 0)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} done, {time.perf_counter() - start:.0f} s", flush=True)
        return points, order[0].trainer.accelerator.mixed_precision  # what "auto" became
    finally:
        for p in points.values():
            if p.trainer is not None:
                p.trainer.loggers.close()
                p.trainer = None  # free the models before the memory runs
        gc.collect()


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    """The growth run of ``main`` (or, with ``--child``, one point's memory run)."""
    path, overrides = preset_path(args.preset), parse_sets(args.set)
    base = load_config(path, overrides)
    with offline_wandb_env() as tmp:
        if args.child:
            batch, image = args.child
            point = Point(batch, image)
            point.build(point_config(path, tmp / "run", overrides, batch, image))
            point.block(args.steps, record=False)
            print(f"{CHILD_RSS}{peak_rss_mb():.1f}", flush=True)
            return 0
        keys = list(dict.fromkeys([(b, base.model.image_size) for b in sorted(args.batch_sizes)]
                                  + [(base.train.batch_size, s) for s in sorted(args.image_sizes)]))
        points, precision = time_points(path, overrides, keys, args.rounds, args.steps, tmp)
    order = list(points.values())
    if args.rss:
        child_argv = [a for a in argv if a not in ("--png", "--no-png")]
        for p in order:
            p.rss_mb = child_rss_mb(child_argv, p.batch, p.image)
            print(f"peak RSS {p.label}: {p.rss_mb:.0f} MB", flush=True)

    batch_axis = [points[(b, base.model.image_size)] for b in sorted(set(args.batch_sizes))]
    image_axis = [points[(base.train.batch_size, s)] for s in sorted(set(args.image_sizes))]
    preset_point = points.get((base.train.batch_size, base.model.image_size), order[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n## How cost grows: preset {args.preset}\n\ntorch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {device}, precision {precision}, telemetry off; {args.rounds - 1} timed "
          f"rounds (+1 warm-up) x {args.steps} steps per point, interleaved, order reversed every round\n")
    print(markdown_table(batch_axis, image_axis, preset_point))
    if args.raw:
        raw = [{"batch": p.batch, "image": p.image, "ms_per_step": p.ms, "peak_rss_mb": p.rss_mb} for p in order]
        args.raw.write_text(json.dumps(raw, indent=1))
    print()
    for line in growth_lines(batch_axis, image_axis, preset_point):
        print(line)
    if args.png:
        png = args.figure_dir / f"growth_{Path(args.preset).stem}.png"
        title = (f"mmtrain step time, preset {Path(args.preset).stem} ({device}, {torch.get_num_threads()} threads; "
                 "interleaved blocks, median and IQR of per-round ratios)")
        problem = write_pngs([(growth_figure(batch_axis, image_axis, preset_point, title), png)], width=1100)
        # write_pngs words its reasons for mmtrain report; the part before "; the HTML report" is the reason.
        reason = (problem or "").split("; the HTML report")[0].split(", the HTML report")[0]
        print(f"plot: {png}" if problem is None else f"plot not written: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
