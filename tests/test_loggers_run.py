"""A real run with every logger on: W&B (offline), TensorBoard and CSV hold what metrics.jsonl holds.

TensorBoard's event files are read back with TensorBoard's own reader (EventAccumulator), so
this fails if the files do not open in TensorBoard, not only if our writer misbehaves.
"""

import contextlib
import csv
import io
import math
import numbers

import pytest
from conftest import TINY, read_jsonl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_files import offline_runs

from mmtrain.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("all-loggers")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["train", "--config", str(TINY), "--train.output_dir", str(out), "--wandb.mode", "offline",
                    "--log.loggers", "wandb,tensorboard,csv", "--wandb.log_frequency", "2",
                    "--wandb.image_log_frequency", "4", "--wandb.media_samples", "2"])
    assert code == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return out


def _jsonl_scalars(out) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for line in read_jsonl(out / "metrics.jsonl"):
        for key, value in line.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                series.setdefault(key, {})[line["step"]] = float(value)
    return series


def test_every_scalar_of_metrics_jsonl_is_in_tensorboard_at_the_same_steps(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    expected = _jsonl_scalars(run)
    assert len(expected) > 50 and "val/total_loss" in expected and "hw/rank0/rss_mb" in expected
    tags = set(acc.Tags()["scalars"])
    assert set(expected) <= tags, sorted(set(expected) - tags)[:10]
    for key, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert sorted(got) == sorted(by_step), key
        for step, value in by_step.items():
            assert math.isclose(got[step], value, rel_tol=1e-6, abs_tol=1e-30) or \
                (math.isnan(value) and math.isnan(got[step])), (key, step, got[step], value)
    assert {e.step for e in acc.Images("media/reconstructions")} == {4, 8, 12}


def test_metrics_csv_holds_every_scalar_in_long_format(run):
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "name", "value"]
    got: dict[str, dict[int, float]] = {}
    for row in rows:
        got.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    expected = _jsonl_scalars(run)
    assert set(got) == set(expected)
    assert len(rows) == sum(len(by_step) for by_step in expected.values())  # one row per (step, name)
    for key, by_step in expected.items():
        assert got[key] == pytest.approx(by_step, rel=1e-12, nan_ok=True), key


def test_the_report_names_every_logger_and_wandb_still_writes_its_run(run):
    printed = (run / "printed.txt").read_text()
    [wandb_run] = offline_runs(run)
    assert f"W&B run:    {wandb_run.parent}  (offline; upload with: wandb sync" in printed
    assert f"TensorBoard: {run / 'tensorboard'}" in printed and f"CSV:        {run / 'metrics.csv'}" in printed
    assert (run / "summary.json").is_file() and (run / "model" / "README.md").is_file()
