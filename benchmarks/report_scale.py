"""How long ``mmtrain report`` takes on a big sweep: N synthetic run folders of S logged steps each.

Each run folder is what ``mmtrain train`` writes: ``config.yaml`` (``Config().to_yaml()`` with its own
``optim.lr`` and ``train.seed``), ``summary.json``, and a ``metrics.jsonl`` whose lines carry the keys a
one-GPU run logs (losses, latent, image, caption, gradient and learning-dynamics metrics, the
hardware columns of one rank), with validation metrics and a caption table at each epoch end and a
reconstruction grid every 100 steps. Values follow plausible curves with noise, written at full
precision as training writes them.

    python benchmarks/report_scale.py                        # 100 runs x 10,000 steps (about 2.8 GB of JSON)
    python benchmarks/report_scale.py --runs 10 --steps 1000 --png

The runs are generated once into --data (reused when their parameters match); the report is built by
the CLI in a subprocess (``python -m mmtrain report DATA --out OUT``), like a user would, and its
timing line (load, csv, analysis, figures, png, page) is printed with the wall time and output sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PER_RANK = ("cpu_percent", "system_cpu_percent", "rss_mb", "peak_rss_mb", "ram_percent", "step_time",
            "data_wait_fraction", "gpu_memory_used", "gpu_memory_percent", "gpu_utilization", "torch_peak_mb")
VAL = ("val/total_loss", "val/loss_image", "val/loss_caption", "val/loss_alignment", "val/latent_mean",
       "val/latent_std", "val/latent_norm", "val/image_mse", "val/caption_accuracy", "val/caption_perplexity",
       "val/caption_entropy", "val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@1", "val/t2i_R@5")
# A 1x1 gray PNG: the media files only need to exist (the report links or copies them).
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                    "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")


def _record_keys(ranks: int) -> list[str]:
    keys = ["total_loss", "loss_image", "loss_caption", "loss_alignment", "grad_norm", "grad_norm_clipped",
            "clip_fraction", "grad_norm_max", "latent_mean", "latent_std", "latent_min", "latent_max", "latent_norm",
            "image_mse", "image_l1", "image_diff", "image_diff_max", "caption_accuracy", "caption_perplexity",
            "caption_entropy", "grad_mean", "grad_std", "grad_max", "learning_rate", "epoch",
            "samples_per_second", "batch_size", "effective_batch_size", "optimizer_step", "samples_seen",
            "learning_rate/decay", "learning_rate/no_decay"]
    keys += [f"grad_norm/{m}" for m in ("image_encoder", "image_decoder", "caption_decoder", "alignment")]
    keys += list(PER_RANK)  # the main process's readings under their bare names
    keys += [f"hw/rank{r}/{n}" for r in range(ranks) for n in PER_RANK]
    keys += [f"hw/{agg}/{n}" for n in PER_RANK for agg in ("max", "mean")]
    return [*keys, "hw/imbalance_peak_memory", "hw/imbalance_step_time"]


def write_run(folder: Path, steps: int, lr: float, seed: int, ranks: int, steps_per_epoch: int) -> int:
    """One synthetic run folder; returns the number of metrics per training line."""
    from mmtrain.config import Config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.optim.lr, cfg.train.seed, cfg.train.output_dir = lr, seed, str(folder)
    cfg.dump(folder / "config.yaml")
    rng = np.random.default_rng(seed * 1000 + int(lr * 1e6))
    s = np.arange(1, steps + 1, dtype=np.float64)
    quality = 1.0 + 0.3 * abs(math.log10(lr / 1e-3))  # lr 1e-3 is best, farther off is worse
    noise = lambda scale: scale * rng.standard_normal(steps)  # noqa: E731
    total = quality * (1.2 + 4.0 * np.exp(-s / (steps / 6))) + noise(0.05)
    cols = {k: rng.random(steps) for k in _record_keys(ranks)}
    cols.update({
        "total_loss": total, "loss_image": 0.1 * total + noise(0.005), "loss_caption": 0.6 * total + noise(0.02),
        "loss_alignment": 0.6 * total + noise(0.02), "grad_norm": 2.0 * np.exp(-s / steps) + np.abs(noise(0.2)),
        "latent_std": 1.0 - 0.5 * np.exp(-s / 500) + noise(0.01), "latent_mean": noise(0.05),
        "latent_norm": 10.0 - 5 * np.exp(-s / 500) + noise(0.1), "latent_min": -3 + noise(0.1),
        "latent_max": 3 + noise(0.1), "caption_accuracy": 0.9 - 0.8 * np.exp(-s / 2000) + noise(0.01),
        "learning_rate": lr * 0.5 * (1 + np.cos(np.pi * (s - 1) / steps)), "epoch": s / steps_per_epoch,
        "samples_per_second": 900 + noise(20.0)})
    keys = list(cols)
    matrix = np.column_stack([cols[k] for k in keys]).tolist()
    media = folder / "media"
    (media / "reconstructions").mkdir(parents=True, exist_ok=True)
    (media / "captions").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(matrix):
        step = i + 1
        rec = {"step": step, **dict(zip(keys, row, strict=True))}
        if step % 100 == 0:
            path = f"media/reconstructions/step_{step:08d}.png"
            (folder / path).write_bytes(PNG)
            rec["media/reconstructions"] = {"_type": "image-file", "path": path, "caption": None}
        if step % steps_per_epoch == 0 or step == steps:
            loss = float(total[i]) * 1.05
            rec.update({k: float(rng.random()) for k in VAL})
            rec.update({"val/total_loss": loss, "epoch_train_loss_avg": float(total[max(0, i - 50):i + 1].mean()),
                        "epoch_val_loss_avg": loss, "val_train_loss_ratio": loss / float(total[i])})
            path = f"media/captions/step_{step:08d}.table.json"
            (folder / path).write_text(json.dumps({"columns": ["ground_truth", "generated"],
                                                   "data": [["two circles", "two circles"]] * 8}))
            rec["media/captions"] = {"_type": "table-file", "path": path, "nrows": 8}
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = float(total[-1]) * 1.05
    (folder / "summary.json").write_text(json.dumps({
        "final_validation_loss": final, "best_validation_loss": final,
        "best_validation_epoch": steps // steps_per_epoch,
        "final_train_loss": float(total[-1]), "optimizer_steps": steps, "samples_seen": steps * 32,
        "train_time_seconds": steps * 0.1, "samples_per_second": 320.0, "findings": []}))
    return len(keys)


def _write(args: tuple) -> int:
    return write_run(*args)


def generate(data: Path, runs: int, steps: int, ranks: int) -> None:
    stamp = {"runs": runs, "steps": steps, "ranks": ranks, "version": 1}
    marker = data / "benchmark.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        print(f"reusing {runs} runs x {steps} steps in {data}")
        return
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    seeds_per = max(1, runs // len(lrs))
    jobs = [(data / f"trial-{i:03d}", steps, lrs[i % len(lrs)], i // len(lrs) % seeds_per, ranks, max(1, steps // 10))
            for i in range(runs)]
    t = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        counts = list(pool.map(_write, jobs))
    marker.write_text(json.dumps(stamp))
    size = sum((j[0] / "metrics.jsonl").stat().st_size for j in jobs)
    print(f"generated {runs} runs x {steps} steps ({counts[0]} metrics per line, {size / 1e9:.2f} GB of metrics.jsonl) "
          f"in {time.perf_counter() - t:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10_000, help="logged steps per run")
    ap.add_argument("--ranks", type=int, default=1, help="per-rank hardware columns of this many ranks")
    ap.add_argument("--data", type=Path, default=Path("/tmp/mmtrain-report-scale/runs"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mmtrain-report-scale/report"))
    ap.add_argument("--png", action="store_true", help="also render the PNGs (needs Chromium)")
    args = ap.parse_args()
    generate(args.data, args.runs, args.steps, args.ranks)
    cmd = [sys.executable, "-m", "mmtrain", "report", str(args.data), "--out", str(args.out)]
    if not args.png:
        cmd.append("--no-png")
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        sys.exit(proc.returncode)
    history = args.out / "history.csv"
    with history.open("rb") as f:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1
    print(f"wall {wall:.1f} s for {args.runs} runs x {args.steps} steps; history.csv "
          f"{history.stat().st_size / 1e9:.2f} GB ({rows:,} rows); "
          f"index.html {(args.out / 'index.html').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
