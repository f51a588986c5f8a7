"""``mmtrain report``: the analysis functions against naive references, run folders read as they are
(in progress, truncated, odd values), the exports, bad input, and the whole report of real tiny runs.

Real runs are trained once per test session (trained_runs(); the browser test uses them too).
"""

import atexit
import csv
import json
import math
import random
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, reset_accelerate

from mmtrain.cli import main
from mmtrain.config import Config
from mmtrain.report import analysis, runs
from mmtrain.report.figures import drawn_metric

PANELS = ("loss", "components", "latent", "gradients", "hardware", "lr", "captions", "throughput")

# ----------------------------------------------------------------------------------------------- helpers

TRAINED = [("lr3e-3-seed1", "3e-3", "1"), ("lr3e-3-seed2", "3e-3", "2"), ("lr1e-3-seed1", "1e-3", "1")]
_trained_root: Path | None = None


def trained_runs() -> Path:
    """A folder of three real tiny runs (two seeds of one config, and another learning rate), with
    reconstruction grids and caption tables; trained once per test process."""
    global _trained_root
    if _trained_root is None:
        root = Path(tempfile.mkdtemp(prefix="mmtrain-report-runs-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        for name, lr, seed in TRAINED:
            rc = main(["train", "--config", str(TINY), "--train.output_dir", str(root / name), "--wandb.mode",
                       "disabled", "--optim.lr", lr, "--train.seed", seed, "--wandb.image_log_frequency", "4",
                       "--wandb.media_samples", "4"])
            reset_accelerate()
            assert rc == 0
        _trained_root = root
    return _trained_root


PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                        "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")


def record(step: int, total: float, grad: float = 1.0, **extra) -> dict:
    """A training-window line as the trainer writes it (the keys the panels draw)."""
    rec = {"step": step, "total_loss": total, "loss_image": total * 0.1, "loss_caption": total * 0.5,
           "loss_alignment": total * 0.8, "grad_norm": grad, "grad_norm_max": grad * 1.2, "grad_max": grad / 10,
           "clip_fraction": 0.0, "latent_mean": 0.01, "latent_std": 1.0, "latent_min": -3.0, "latent_max": 3.0,
           "latent_norm": 5.0, "caption_accuracy": 0.5, "caption_perplexity": 9.0, "caption_entropy": 2.0,
           "learning_rate": 1e-3, "epoch": step / 10, "samples_per_second": 100.0, "data_wait_fraction": 0.01,
           "step_time": 0.1, "hw/rank0/rss_mb": 900.0, "hw/rank0/cpu_percent": 99.0, "hw/imbalance_peak_memory": 1.0,
           "hw/imbalance_step_time": 1.0}
    rec.update(extra)
    return rec


def write_run(folder: Path, lr: float = 1e-3, seed: int = 0, final: float | None = 1.0, steps: int = 30,
              summary: bool = True, spike_at: int | None = None, **config) -> list[dict]:
    """A synthetic run folder: config.yaml from Config().to_yaml(), metrics.jsonl (a training line per
    step, validation and a caption table every 10 steps), summary.json. Returns the records."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.optim.lr, cfg.train.seed, cfg.train.output_dir = lr, seed, str(folder)
    for key, value in config.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    cfg.dump(folder / "config.yaml")
    (folder / "media" / "captions").mkdir(parents=True, exist_ok=True)
    (folder / "media" / "reconstructions").mkdir(parents=True, exist_ok=True)
    recs = []
    for step in range(1, steps + 1):
        rec = record(step, 3.0 - step * 0.05 + seed * 0.01, grad=100.0 if step == spike_at else 1.0)
        if step % 10 == 5:
            rel = f"media/reconstructions/step_{step:08d}.png"
            (folder / rel).write_bytes(PNG_1x1)
            rec["media/reconstructions"] = {"_type": "image-file", "path": rel, "caption": None}
        if step % 10 == 0:
            rel = f"media/captions/step_{step:08d}.table.json"
            (folder / rel).write_text(json.dumps({"columns": ["ground_truth", "generated"],
                                                  "data": [["two circles", "two squares"]]}))
            rec.update({"val/total_loss": (final if final is not None else 2.0) + 0.1 * (steps - step) / 10,
                        "val/caption_accuracy": 0.4, "val/i2t_R@1": 0.3, "epoch_train_loss_avg": 2.0,
                        "epoch_val_loss_avg": 2.1, "val_train_loss_ratio": 1.05,
                        "media/captions": {"_type": "table-file", "path": rel, "nrows": 1}})
        recs.append(rec)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if summary:
        (folder / "summary.json").write_text(json.dumps({"final_validation_loss": final, "final_train_loss": 1.5,
                                                         "best_validation_loss": final, "optimizer_steps": steps}))
    return recs


def naive_history(run: str, lines: list[str]) -> list[list[str]]:
    """history.csv's rows the slow, obvious way: every number of every parsed line."""
    rows = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for k, v in rec.items():
            if k == "step" or isinstance(v, (bool, str, dict, list)):
                continue
            rows.append([run, str(rec["step"]), k, "nan" if v is None else repr(v)])
    return rows


def report(*argv: str) -> int:
    return main(["report", *argv])


# ----------------------------------------------------------------------------------------------- analysis

def test_downsample_keeps_every_buckets_extremes_and_the_ends():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(10_001)
    values[1234], values[7777] = 50.0, -60.0  # one-step spikes must survive
    values[500:520] = np.nan
    idx = analysis.downsample_indices(values, 400)
    assert len(idx) <= 400 and idx[0] == 0 and idx[-1] == len(values) - 1
    assert np.all(np.diff(idx) > 0)
    assert {1234, 7777} <= set(idx.tolist())
    # Naive reference: each of the 100 buckets keeps its first, last, smallest and largest finite value.
    size = math.ceil(len(values) / 100)
    for start in range(0, len(values), size):
        bucket = values[start:start + size]
        finite = [(v, start + j) for j, v in enumerate(bucket) if not math.isnan(v)]
        expected = {start, min(start + size, len(values)) - 1}
        if finite:
            expected |= {min(finite)[1], max(finite)[1]}
        assert expected <= set(idx.tolist())
    short = np.arange(50.0)
    assert analysis.downsample_indices(short, 400).tolist() == list(range(50))


def test_points_per_line_shares_a_budget():
    assert analysis.points_per_line(1) == 2000
    assert analysis.points_per_line(100) == 400
    assert analysis.points_per_line(10_000) == 200


def test_spread_and_pooled_std_match_statistics():
    values = [4.72, 4.75, 4.69, None, float("nan")]
    s = analysis.spread(values)
    finite = [4.72, 4.75, 4.69]
    assert s.n == 3
    assert s.mean == pytest.approx(statistics.mean(finite), rel=1e-12)
    assert s.std == pytest.approx(statistics.stdev(finite), rel=1e-12)
    assert s.var == pytest.approx(statistics.variance(finite), rel=1e-12)
    assert (s.min, s.max) == (4.69, 4.75)
    assert math.isnan(analysis.spread([1.0]).std)
    groups = [[1.0, 2.0, 4.0], [10.0, 10.5], [7.0]]
    num = 2 * statistics.variance(groups[0]) + 1 * statistics.variance(groups[1])
    assert analysis.pooled_std(groups) == pytest.approx(math.sqrt(num / 3), rel=1e-12)
    assert math.isnan(analysis.pooled_std([[1.0], [2.0]]))


def test_mean_band_matches_a_per_step_reference():
    a = (np.array([1, 2, 3, 4]), np.array([1.0, 2.0, 3.0, 4.0]))
    b = (np.array([1, 2, 3]), np.array([3.0, np.nan, 5.0]))  # in progress, and a NaN logged at step 2
    c = (np.array([2, 4, 6]), np.array([6.0, 8.0, 10.0]))
    steps, mean, std, count = analysis.mean_band([a, b, c])
    assert steps.tolist() == [1, 2, 3, 4, 6]
    for k, step in enumerate(steps):
        present = [float(v[list(s).index(step)]) for s, v in (a, b, c) if step in s]
        present = [v for v in present if not math.isnan(v)]
        assert count[k] == len(present)
        assert mean[k] == pytest.approx(statistics.mean(present))
        if len(present) > 1:
            assert std[k] == pytest.approx(statistics.stdev(present))
        else:
            assert math.isnan(std[k])


def test_correlations_match_hand_computations():
    rng = random.Random(1)
    x = [rng.random() for _ in range(20)]
    y = [2 * v + rng.random() for v in x]
    assert analysis.pearson(x, y) == pytest.approx(statistics.correlation(x, y), rel=1e-12)
    assert math.isnan(analysis.pearson([1, 1, 1], [1, 2, 3]))
    codes = [0, 0, 1, 1, 2, 2]
    ys = [1.0, 2.0, 3.0, 5.0, 9.0, 10.0]
    mean = sum(ys) / 6
    between = sum(2 * (sum(ys[2 * c:2 * c + 2]) / 2 - mean) ** 2 for c in range(3))
    total = sum((v - mean) ** 2 for v in ys)
    assert analysis.correlation_ratio(codes, ys) == pytest.approx(math.sqrt(between / total), rel=1e-12)
    # For two categories, eta is |Pearson's r| of the 0/1 codes.
    two = [0, 1, 0, 1, 1]
    y2 = [1.0, 3.0, 2.0, 5.0, 4.0]
    assert analysis.correlation_ratio(two, y2) == pytest.approx(abs(statistics.correlation(two, y2)))


def test_encode_kinds():
    assert analysis.encode([1e-4, 1e-3, 1e-2]).kind == "log"
    assert analysis.encode([1e-4, 1e-3, 1e-2]).drawn.tolist() == pytest.approx([-4, -3, -2])
    assert analysis.encode([8, 16, 32]).kind == "numeric"
    enc = analysis.encode(["bf16", "no", "bf16"])
    assert (enc.kind, enc.labels, enc.values.tolist()) == ("categorical", ("bf16", "no"), [0, 1, 0])
    assert analysis.encode([True, False]).kind == "categorical"
    assert analysis.encode([1e-3, runs.MISSING]).kind == "categorical"


def test_parameter_importance_names_the_parameter_that_matters():
    rng = random.Random(0)
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] * 4
    batch = [rng.choice([8, 16, 32]) for _ in lrs]
    decay = [rng.choice([0.0, 1e-4]) for _ in lrs]
    loss = [abs(math.log10(lr) + 3) + rng.gauss(0, 0.02) for lr in lrs]  # lr matters; batch, decay do not
    rows, why = analysis.parameter_importance({"optim.lr": lrs, "train.batch_size": batch,
                                               "optim.weight_decay": decay}, loss)
    assert why is None
    assert rows[0].param == "optim.lr" and rows[0].importance > 0.6
    assert sum(r.importance for r in rows) == pytest.approx(1.0)
    by = {r.param: r for r in rows}
    assert by["optim.lr"].kind == "log"
    assert by["optim.lr"].correlation == pytest.approx(
        statistics.correlation([math.log10(v) for v in lrs], loss), rel=1e-9)
    assert by["train.batch_size"].correlation == pytest.approx(statistics.correlation(batch, loss), rel=1e-9)
    assert "optim.lr matters most" in analysis.verdict(rows, why)


def test_parameter_importance_needs_enough_runs():
    params = {"optim.lr": [1e-3, 2e-3, 3e-3], "train.batch_size": [8, 16, 8]}
    rows, why = analysis.parameter_importance(params, [1.0, 2.0, 3.5])
    assert "at least 4" in why
    assert math.isnan(rows[0].importance) and rows[0].param == "optim.lr"
    assert rows[0].correlation == pytest.approx(statistics.correlation([1e-3, 2e-3, 3e-3], [1.0, 2.0, 3.5]))
    assert "optim.lr has the strongest correlation" in analysis.verdict(rows, why)
    one, _ = analysis.parameter_importance({"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]}, [1.0, 2.0, 3.5, 3.0])
    assert one[0].importance == pytest.approx(1.0)
    assert "optim.lr is the only parameter that varies" in analysis.verdict(one, None)


def test_varying_params_and_seed_groups():
    flats = [runs.flatten_config(Config().to_dict()) for _ in range(4)]
    for i, flat in enumerate(flats):
        flat["train.output_dir"] = f"runs/{i}"
        flat["wandb.name"] = f"trial-{i}"
        flat["train.seed"] = i % 2
    flats[2]["optim.lr"] = flats[3]["optim.lr"] = 5e-4
    assert runs.varying_params(flats) == ["optim.lr"]
    assert runs.varying_params(flats, include_seed=True) == ["optim.lr", "train.seed"]
    assert analysis.seed_groups(flats) == [[0, 1], [2, 3]]
    assert runs.flatten_config({"wandb": {"tags": ["a", "b"]}}) == {"wandb.tags": ("a", "b")}


# ----------------------------------------------------------------------------------------------- reading runs

def test_find_runs_in_run_and_sweep_folders(tmp_path):
    write_run(tmp_path / "sweep" / "trial-000")
    write_run(tmp_path / "sweep" / "trial-001")
    write_run(tmp_path / "group" / "sweepB" / "trial-000")
    write_run(tmp_path / "single")
    (tmp_path / "sweep" / "notes").mkdir()
    found = runs.find_runs([tmp_path / "sweep", tmp_path / "group", tmp_path / "single" / "metrics.jsonl",
                            tmp_path / "single"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "sweep/trial-000", "sweep/trial-001", "group/sweepB/trial-000", "single"]
    assert runs.run_names(found) == ["sweep/trial-000", "sweep/trial-001", "sweepB/trial-000", "single"]


def test_in_progress_run_with_a_torn_last_line(tmp_path):
    recs = write_run(tmp_path / "run", summary=False)
    path = tmp_path / "run" / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text + json.dumps(record(31, 1.0))[:40])  # the trainer is writing this line right now
    run = runs.load_run(tmp_path / "run", "run", drawn_metric, tmp_path / "h.csv")
    assert run.status == "in progress"
    assert (run.n_records, run.last_step, run.skipped_lines) == (30, 30, 1)
    assert run.final_val_loss == pytest.approx(recs[29]["val/total_loss"])  # no summary: the last val/total_loss
    rows = list(csv.reader((tmp_path / "h.csv").open()))
    assert rows == naive_history("run", text.splitlines())


def test_history_rows_equal_the_naive_rows_for_odd_values():
    lines = [
        json.dumps({"step": 1, "a": 1.5, "b": None, "c": 10, "d": 1e-300, "e": 1e308, "f": -0.0}),
        json.dumps({"step": 2, "a": 2.5, "media/x": {"_type": "image-file", "path": "media/x.png"}, "s": "text"}),
        json.dumps({"step": 3, "a": True, "b": 2.0}),
        json.dumps({"step": 4, "odd,name": 1.0, 'q"uote': 2.0, "ünï": 3.0, "new\nline": 4.0}),
        json.dumps({"step": 5, "list": [1, 2], "a": 3.25}),
        json.dumps({"step": 6, "a": 1.5, "b": None, "c": 10, "d": 1e-300, "e": 1e308, "f": -0.0}),
        json.dumps({"step": 7, "a": 1.0, "m": "x"}),
        json.dumps({"step": 8, "a": "text", "m": 2.0}),  # same keys as step 7, other types
    ]
    records, kept, _ = runs.parse_lines("\n".join(lines))
    columns, media, plain, nulls = runs.columns_of(records)
    assert plain.tolist() == [True, False, False, False, False, True, False, False] and nulls
    assert media == {"media/x": [(2, "media/x.png")]}
    # Columns: every number (null = NaN) of every line, in order; text, booleans, objects, lists are not numbers.
    naive: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for k, v in rec.items():
            if k != "step" and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
                naive.setdefault(k, []).append((rec["step"], math.nan if v is None else float(v)))
    assert sorted(columns) == sorted(naive)
    for k, pairs in naive.items():
        assert columns[k][0].tolist() == [s for s, _ in pairs]
        np.testing.assert_array_equal(columns[k][1], [v for _, v in pairs])
    fast = runs.history_rows("r,1", records, kept, plain.tolist(), nulls)
    assert fast == runs.history_rows("r,1", records, kept)  # the same rows as when every line's text is checked
    assert list(csv.reader(fast.splitlines(keepends=True))) == naive_history("r,1", lines)


def test_columns_agree_with_the_diagnostics_history(tmp_path):
    diagnostics = pytest.importorskip("mmtrain.diagnostics")
    recs = write_run(tmp_path / "run", spike_at=25)
    run = runs.load_run(tmp_path / "run", "run", drawn_metric)
    history = diagnostics.History.from_records(recs)
    columns, _, _, _ = runs.columns_of(recs)
    assert sorted(columns) == sorted(history.names())
    for name in history.names():
        np.testing.assert_array_equal(columns[name][0], history.series(name)[0])
        np.testing.assert_array_equal(columns[name][1], history.series(name)[1])
    expected = [f.to_dict() for f in diagnostics.diagnose_run(recs, runs.read_config(tmp_path / "run"))]
    assert run.findings == expected and run.findings_source == "diagnose_run"
    assert any(f["rule"] == "gradient_explosion" and f["step"] == 25 for f in run.findings)


# ----------------------------------------------------------------------------------------------- the report

def _local_refs(html: str) -> list[str]:
    import re

    return re.findall(r'(?:src|href)="([^"#][^"]*)"', html)


def test_report_of_a_synthetic_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    finals = {}
    trials = [(1e-3, 0, 1.0), (1e-3, 1, 1.01), (1e-3, 2, 1.03), (1e-2, 0, 2.0), (1e-2, 1, 2.01), (1e-4, 0, 1.5)]
    for i, (lr, seed, final) in enumerate(trials):
        finals[f"trial-{i:03d}"] = final
        write_run(sweep / f"trial-{i:03d}", lr=lr, seed=seed, final=finals[f"trial-{i:03d}"],
                  spike_at=25 if i == 3 else None, wandb__name=f"trial-{i}")
    write_run(tmp_path / "extra", lr=3e-3, final=None, summary=False, steps=5)  # in progress, no validation yet
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert report(str(sweep), str(tmp_path / "extra"), "--out", str(out), "--no-png") == 0
    html = (out / "index.html").read_text()
    # Offline: every reference is a relative path to a file in DIR.
    for ref in _local_refs(html):
        if ref == "data:,":  # the empty favicon: no request at all
            continue
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (out / ref).is_file(), ref
    assert "<script src=\"assets/plotly.min.js\">" in html and (out / "assets" / "plotly.min.js").stat().st_size > 1e6
    for panel in PANELS:
        assert f'id="panel-{panel}"' in html
    for anchor in ("findings", "ranking", "seeds", "hyperparameters", "media"):
        assert f'id="{anchor}"' in html
    # The ranking: best final validation loss first, the run without one last.
    table = html[html.index('id="ranked-runs"'):]
    positions = [table.index(f">{name}</a>") for name in ["trial-000", "trial-001", "trial-002", "trial-005",
                                                          "trial-003", "trial-004", "extra"]]
    assert positions == sorted(positions)
    # Seeds: the lr=0.001 group's spread is statistics.stdev of its three finals.
    seeds = html[html.index('id="seed-groups"'):]
    stdev = statistics.stdev([finals[f"trial-00{i}"] for i in range(3)])
    assert f'data-sort="{stdev!r}"' in seeds
    # Hyperparameters: lr is the parameter that matters (seed and bookkeeping are not parameters).
    r = statistics.correlation([math.log10(lr) for lr, _, _ in trials], [f for _, _, f in trials])
    assert f"optim.lr is the only parameter that varies: correlation {r:+.2f}" in html
    assert "wandb.name" not in html[html.index('id="importance"'):html.index("</table>", html.index('id="importance"'))]
    # Findings: trial-003's spike, with its evidence and a link to the gradients panel.
    block = html[html.index('id="findings-trial-003"'):]
    block = block[:block.index("</details>")]
    assert "gradient_explosion" in block and 'href="#panel-gradients"' in block
    found = runs.load_run(sweep / "trial-003", "trial-003", drawn_metric).findings  # diagnose_run's
    assert any(f["rule"] == "gradient_explosion" for f in found)
    for f in found:
        assert f["message"] in block
        for k, v in f["evidence"].items():
            assert f"<code>{k} = {v:.4g}</code>" in block
    # Media: the caption tables, ground truth vs generated.
    assert "<td>two circles</td><td class=\"mismatch\">two squares</td>" in html
    # Exports.
    history = list(csv.reader((out / "history.csv").open()))
    assert history[0] == ["run", "step", "metric", "value"]
    expected = []
    for name in sorted(finals):
        expected += naive_history(name, (sweep / name / "metrics.jsonl").read_text().splitlines())
    expected += naive_history("extra", (tmp_path / "extra" / "metrics.jsonl").read_text().splitlines())
    assert sorted(history[1:]) == sorted(expected)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["run"] for r in summary] == [*sorted(finals), "extra"]
    for row in summary[:-1]:
        assert float(row["final_validation_loss"]) == pytest.approx(finals[row["run"]])
        assert row["optim.lr"] and row["train.seed"] and row["last/val/total_loss"]
    assert summary[-1]["status"] == "in progress" and summary[-1]["final_validation_loss"] == ""
    assert "gradient_explosion" in summary[3]["findings_rules"].split(";")
    assert "gradient_explosion" not in summary[0]["findings_rules"].split(";")
    assert "mmtrain report: 7 run(s)" in capsys.readouterr().err
    grids = sorted(p.relative_to(out).as_posix() for p in (out / "media").rglob("*.png"))
    assert len(grids) == 6 * 3 + 1 and "media/trial-001/reconstructions/step_00000015.png" in grids
    assert all(f'src="{g}"' in html for g in grids)
    # A second report into the same folder replaces the first one's files, and only those.
    assert report(str(sweep / "trial-000"), "--out", str(out), "--no-png") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "media").iterdir()) == ["trial-000"]
    assert len(list(csv.DictReader((out / "summary.csv").open()))) == 1


def test_names_and_infinities_stay_data(tmp_path):
    """A run folder named like markup is text everywhere; ±inf (written ±1e308) is a gap in a chart."""
    recs = write_run(tmp_path / "x<i>&y", steps=12)
    recs[5]["grad_norm"] = 1e308
    (tmp_path / "x<i>&y" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert report(str(tmp_path / "x<i>&y"), "--out", str(tmp_path / "r"), "--no-png") == 0
    html = (tmp_path / "r" / "index.html").read_text()
    assert "x<i>" not in html and "x&lt;i&gt;&amp;y" in html
    run = runs.load_run(tmp_path / "x<i>&y", "r", drawn_metric)
    assert math.isnan(run.series["grad_norm"][1][5]) and run.last["grad_norm"] == 1.0
    assert "r,6,grad_norm,1e+308" in (tmp_path / "r" / "history.csv").read_text().replace("x<i>&y", "r")


@dataclass(frozen=True)
class FakeFinding:
    """mmtrain.diagnostics.Finding's fields (the report reads findings through to_dict only)."""

    rule: str
    step: int
    severity: str
    message: str
    evidence: dict
    panel: str

    def to_dict(self) -> dict:
        return asdict(self)


def test_findings_are_shown_with_evidence_and_a_panel_link(tmp_path, monkeypatch):
    """The page's wiring of findings, independent of the rules: a stand-in for the rules, then rules
    that fail on this run (the findings summary.json recorded are shown instead, with the error)."""
    seen = []

    def diagnose_columns(columns, config):
        seen.append((len(columns["total_loss"][0]), config["optim"]["lr"]))
        return [FakeFinding("gradient_explosion", 7, "warning", "spike <b>here</b>", {"grad_norm": 123.456789},
                            "gradients"),
                FakeFinding("lr_schedule", 3, "info", "schedule off", {"learning_rate": 0.5, "note": "x"}, "lr")]

    monkeypatch.setattr(runs, "diagnose_columns", diagnose_columns)
    write_run(tmp_path / "a", lr=2e-3)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    summary["findings"] = [{"rule": "data_wait", "step": 4, "severity": "warning", "message": "recorded in training",
                            "evidence": {"data_wait_fraction": 0.3}, "panel": "throughput"}]
    (tmp_path / "a" / "summary.json").write_text(json.dumps(summary))
    assert report(str(tmp_path / "a"), "--out", str(tmp_path / "r1"), "--no-png") == 0
    assert seen == [(30, 2e-3)]
    html = (tmp_path / "r1" / "index.html").read_text()
    block = html[html.index('id="findings-a"'):]
    block = block[:block.index("</details>")]
    assert "spike &lt;b&gt;here&lt;/b&gt;" in block and '<a href="#panel-gradients">' in block
    assert "<code>grad_norm = 123.5</code>" in block and "<code>note = x</code>" in block
    assert '<a href="#panel-lr">' in block and "recorded in training" not in block
    assert "1 warning(s), 1 info" in block
    # Rules that fail on this run: what summary.json recorded, said so.
    def failing(columns, config):
        raise ValueError("odd run")

    monkeypatch.setattr(runs, "diagnose_columns", failing)
    assert report(str(tmp_path / "a"), "--out", str(tmp_path / "r2"), "--no-png") == 0
    html = (tmp_path / "r2" / "index.html").read_text()
    assert "recorded in training" in html and "findings recorded in summary.json" in html
    assert '<a href="#panel-throughput">' in html


@pytest.mark.parametrize("case", ["missing", "empty", "bad_config", "no_config", "out_is_file", "out_is_run"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    run = tmp_path / "run"
    write_run(run)
    out = tmp_path / "out"
    args = [str(run)]
    if case == "missing":
        args = [str(tmp_path / "nope")]
    elif case == "empty":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        args = [str(tmp_path / "empty")]
    elif case == "bad_config":
        (run / "config.yaml").write_text("optim: [unclosed\n")
    elif case == "no_config":
        (run / "config.yaml").unlink()
    elif case == "out_is_file":
        out.write_text("x")
    elif case == "out_is_run":
        out = run
    assert report(*args, "--out", str(out), "--no-png") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtrain: error: ")
    words = {"missing": "no such file", "empty": "holds no runs", "bad_config": "not valid YAML",
             "no_config": "config.yaml: missing", "out_is_file": "is a file", "out_is_run": "one of the run folders"}
    assert words[case] in err[0]
    assert not (tmp_path / "out" / "index.html").exists()


def test_parallel_and_serial_reads_agree(tmp_path, monkeypatch):
    for i in range(3):
        write_run(tmp_path / "sweep" / f"t{i}", lr=10 ** -(i + 2), steps=40, spike_at=30 if i == 1 else None)
    paths = runs.find_runs([tmp_path / "sweep"])
    serial = runs.load_runs(paths, drawn_metric, history=tmp_path / "a.csv", history_header="h\n", workers=1)
    monkeypatch.setattr(runs, "PARALLEL_BYTES", 0)
    parallel = runs.load_runs(paths, drawn_metric, history=tmp_path / "b.csv", history_header="h\n", workers=2)
    assert [r.name for r in serial] == [r.name for r in parallel]
    for a, b in zip(serial, parallel, strict=True):
        assert a.findings == b.findings and a.last == b.last and a.media == b.media
        assert sorted(a.series) == sorted(b.series)
    rows = [sorted((tmp_path / name).read_text().splitlines()) for name in ("a.csv", "b.csv")]
    assert rows[0] == rows[1] and len(rows[0]) > 3 * 40 * 20
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_report_of_real_runs_with_pngs_and_media(tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(trained_runs(), root)
    # One more run, still in progress: no summary.json yet and its last line half written.
    shutil.copytree(root / "lr1e-3-seed1", root / "running")
    (root / "running" / "summary.json").unlink()
    metrics = root / "running" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    out = tmp_path / "report"
    assert report(str(root), "--out", str(out)) == 0
    html = (out / "index.html").read_text()
    pngs = sorted(p.name for p in (out / "png").glob("*.png"))
    assert {f"panel-{p}.png" for p in PANELS} <= set(pngs)
    for name in pngs:
        assert (out / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'href="png/{name}"' in html
    # Reconstruction grids over time, and the caption tables, brought into DIR and shown.
    for name, _, _ in TRAINED:
        grids = sorted((root / name / "media" / "reconstructions").glob("*.png"))
        assert len(grids) >= 2
        for grid in grids:
            copy = out / "media" / name / "reconstructions" / grid.name
            assert copy.read_bytes() == grid.read_bytes()
            assert f'src="media/{name}/reconstructions/{grid.name}"' in html
    assert "ground_truth" in html and "generated" in html
    # The findings shown are diagnose_run's on each run's own lines.
    from mmtrain.diagnostics import diagnose_run

    for name in ("lr3e-3-seed1", "running"):
        recs, _, _ = runs.parse_lines((root / name / "metrics.jsonl").read_text())
        for f in diagnose_run(recs, runs.read_config(root / name)):
            assert f.message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html
    summary = list(csv.DictReader((out / "summary.csv").open()))
    status = {r["run"]: r["status"] for r in summary}
    assert status["running"] == "in progress" and status["lr3e-3-seed1"] == "finished"
    assert "lr=0.003 (2 seeds)" in html
