"""The metric names the telemetry issue and the W&B guide promise, and one check for all of them."""

from pathlib import Path

from conftest import read_jsonl
from wandb_files import offline_runs, read_run

# Logged every log_frequency optimizer steps (CPU run: no GPU keys).
WINDOW_METRICS = [
    "total_loss", "loss_image", "loss_caption", "loss_alignment",
    "latent_mean", "latent_std", "latent_min", "latent_max", "latent_norm",
    "image_mse", "image_l1", "image_diff", "image_diff_max",
    "caption_accuracy", "caption_perplexity", "caption_entropy",
    "grad_mean", "grad_std", "grad_max", "grad_norm", "grad_norm_clipped", "clip_fraction", "grad_norm_max",
    "grad_norm/image_encoder", "grad_norm/image_decoder", "grad_norm/caption_decoder", "grad_norm/alignment",
    "cpu_percent", "system_cpu_percent", "rss_mb", "ram_percent",
    "learning_rate", "learning_rate/decay", "learning_rate/no_decay", "batch_size", "effective_batch_size",
    "epoch", "optimizer_step", "samples_seen", "samples_per_second", "step_time", "data_wait_fraction",
    "hw/imbalance_peak_memory", "hw/imbalance_step_time", "hw/max/cpu_percent", "hw/mean/cpu_percent",
]
# Logged once per epoch, charted against `epoch`.
EPOCH_METRICS = [
    "epoch_train_loss_avg", "epoch_val_loss_avg", "val_train_loss_ratio", "image_caption_loss_ratio",
    "gradient_norm_trend", "latent_std_trend", "val/total_loss", "val/loss_image", "val/loss_caption",
    "val/loss_alignment", "val/image_mse", "val/image_l1", "val/image_diff", "val/image_diff_max",
    "val/caption_accuracy", "val/caption_perplexity", "val/caption_entropy",
    "val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@1", "val/t2i_R@5",
]
SUMMARY = ["final_validation_loss", "best_validation_loss", "best_validation_epoch", "total_parameters",
           "train_time_seconds", "samples_per_second"]
# Per-rank readings a CPU process always has.
CPU_RANK_KEYS = ["cpu_percent", "system_cpu_percent", "rss_mb", "peak_rss_mb", "ram_percent", "step_time",
                 "data_wait_fraction"]


def assert_every_metric(out: Path, ranks: int = 1) -> tuple[list[dict], dict]:
    """Every promised name is in metrics.jsonl and in the (single) W&B offline run's history."""
    records = read_jsonl(out / "metrics.jsonl")
    jsonl_keys = set().union(*records)
    per_rank = [f"hw/rank{r}/{k}" for r in range(ranks) for k in CPU_RANK_KEYS]
    expected = WINDOW_METRICS + EPOCH_METRICS + per_rank
    assert not [k for k in expected if k not in jsonl_keys], "missing from metrics.jsonl"
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    run = read_run(runs[0])
    history_keys = set().union(*run["history"])
    assert not [k for k in expected if k not in history_keys], "missing from the W&B run"
    assert not [k for k in SUMMARY if k not in run["summary"]], "missing from the W&B summary"
    return records, run
