"""The guide's rules of thumb (mmtrain.diagnostics): each rule on a history made to show its problem,
fired at the step the rule's definition names and silent just below its threshold; the configured
schedule against the real scheduler; the training monitor naming the same findings as the offline
pass; and real short runs made to show a problem (absurd learning rate, unbalanced loss weights, a
tiny train set), where each finding is printed once, logged once as an event, sent as a W&B alert
and listed in summary.json — and a resumed run does not repeat it.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import read_jsonl, reset_accelerate, tiny_config
from wandb_files import offline_runs, read_run

from mmtrain.config import DiagnosticsConfig
from mmtrain.diagnostics import (
    RULES,
    DiagnosticsMonitor,
    History,
    LrSchedule,
    RunContext,
    diagnose,
    diagnose_run,
    event,
)
from mmtrain.loggers import BaseLogger, Loggers

T = DiagnosticsConfig()
WEIGHTS = {"loss_image": 1.0, "loss_caption": 1.0, "loss_alignment": 0.5}
CTX = RunContext(WEIGHTS)


def healthy(n: int = 40, **columns) -> list[dict]:
    """``n`` training records (steps 10, 20, ...) of a run with nothing wrong, with ``columns``
    (name -> values for every record) replacing the healthy ones."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        records.append({
            "step": 10 * (i + 1), "total_loss": 5.0 - 0.05 * i, "loss_image": 0.5, "loss_caption": 2.0,
            "loss_alignment": 2.0, "grad_norm": 3.0 + rng.uniform(-0.5, 0.5), "grad_max": 0.3 + rng.uniform(0, 0.1),
            "latent_mean": 0.05, "latent_std": 1.0 + 0.01 * i, "hw/max/data_wait_fraction": 0.02,
            "hw/max/step_time": 0.102, "hw/mean/step_time": 0.1, "hw/max/gpu_memory_percent": 82.0,
            "system_cpu_percent": 50.0})
        for name, values in columns.items():
            records[-1][name] = values[i]
    return records


def fired(records: list[dict], ctx: RunContext = CTX, **thresholds) -> dict[str, int]:
    t = dataclasses.replace(T, **thresholds)
    return {f.rule: f.step for f in diagnose(History.from_records(records), t, ctx)}


def test_a_healthy_history_has_no_findings():
    assert fired(healthy()) == {}


def test_gradient_spike_fires_at_the_spike_and_not_below_the_factor():
    norms = [3.0] * 40
    norms[25] = 31.0  # > 10 x the median 3.0 of the 20 records before
    assert fired(healthy(grad_norm=norms))["gradient_explosion"] == 260
    norms[25] = 29.0
    assert "gradient_explosion" not in fired(healthy(grad_norm=norms))


def test_grad_max_spike_and_loss_divergence_are_explosions():
    peaks = [0.3] * 40
    peaks[30] = 3.1
    assert fired(healthy(grad_max=peaks))["gradient_explosion"] == 310
    # Divergence right after the first record: 10 x the lowest earlier loss, no median needed.
    losses = [5.0, 51.0] + [300.0] * 38
    assert fired(healthy(total_loss=losses))["gradient_explosion"] == 20
    assert "gradient_explosion" not in fired(healthy(total_loss=[5.0, 49.0] + [40.0] * 38))


def test_vanishing_gradients_need_n_records_in_a_row():
    norms = [3.0] * 10 + [1e-9] * 4 + [3.0] + [1e-9] * 5 + [3.0] * 20
    assert fired(healthy(grad_norm=norms))["vanishing_gradients"] == 200  # the 5th of the second run
    norms[14] = 1e-9  # now 10 in a row from index 10: the 5th is index 14
    assert fired(healthy(grad_norm=norms))["vanishing_gradients"] == 150


def epoch_records(train: list[float], val: list[float], **extra) -> list[dict]:
    return [{"step": 100 * (e + 1), "epoch_train_loss_avg": t, "val/total_loss": v,
             "val_train_loss_ratio": v / t, **{k: vs[e] for k, vs in extra.items()}}
            for e, (t, v) in enumerate(zip(train, val, strict=True))]


def test_overfitting_is_a_positive_gap_growing_for_n_epochs():
    train = [5.0, 4.0, 3.0, 2.5, 2.0, 1.5]
    val = [4.5, 3.9, 3.5, 3.4, 3.45, 3.5]  # gaps -0.5, -0.1, 0.5, 0.9, 1.45, 2.0
    assert fired(epoch_records(train, val))["overfitting"] == 400  # 3 rises ending at epoch 4, gap > 0
    # Gap growing but still negative (val below the epoch's mean training loss): not overfitting.
    assert "overfitting" not in fired(epoch_records([5.0, 4.0, 3.5, 3.2], [3.0, 2.2, 1.8, 1.6]))
    # A gap that stops growing once: the streak restarts.
    assert "overfitting" not in fired(epoch_records([5.0, 4.0, 3.0, 3.0, 2.5], [4.5, 3.9, 3.5, 3.2, 3.0]))


def test_latent_collapse_blowup_and_drift():
    std = [1.0] * 40
    std[12] = 5e-4
    assert fired(healthy(latent_std=std))["latent_collapse"] == 130
    std = [1.0] * 40
    std[20] = 101.0  # > 100 x the first value 1.0
    assert fired(healthy(latent_std=std))["latent_blowup"] == 210
    std[20] = 99.0
    assert "latent_blowup" not in fired(healthy(latent_std=std))
    mean = [0.05] * 10 + [1.5] * 5 + [0.05] * 25  # |mean| > 1 x std (1.1 .. 1.14) for 5 records
    assert fired(healthy(latent_mean=mean))["latent_drift"] == 150
    mean[14] = 0.05
    assert "latent_drift" not in fired(healthy(latent_mean=mean))


def test_lr_schedule_matches_the_real_scheduler():
    """The schedule the rule expects is the one mmtrain.optim builds, step by step (naive reference:
    the rates the real optimizer runs with)."""
    from mmtrain.config import OptimConfig
    from mmtrain.optim import build_scheduler

    for warmup, total, lr, min_lr in ((0, 12, 3e-3, 1e-4), (5, 40, 1e-3, 0.0), (20, 435, 2e-3, 2e-5)):
        cfg = OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler = build_scheduler(opt, cfg, total)
        schedule = LrSchedule(lr, min_lr, warmup, total)
        for step in range(1, total + 1):
            assert math.isclose(schedule.at(step), opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15), step
            opt.step()
            scheduler.step()


def test_lr_schedule_rule_fires_where_the_logged_rate_leaves_the_shape():
    schedule = LrSchedule(1e-3, 0.0, 0, 400)
    records = [{"step": s, "learning_rate": schedule.at(s)} for s in range(10, 401, 10)]
    ctx = RunContext(WEIGHTS, schedule)
    assert "lr_schedule" not in fired(records, ctx)
    records[7]["learning_rate"] = 1e-3  # a constant rate where the cosine has started to decay
    assert fired(records, ctx)["lr_schedule"] == 80


def test_caption_stagnation_accuracy_or_perplexity():
    acc = [0.1, 0.2, 0.3, 0.29, 0.3, 0.28, 0.35]  # best 0.3 at epoch 3, not beaten in epochs 4-6
    ppl = [30.0, 20.0, 15.0, 14.0, 13.0, 12.0, 11.0]
    records = epoch_records([5.0] * 7, [4.0] * 7, **{"val/caption_accuracy": acc, "val/caption_perplexity": ppl})
    assert fired(records)["caption_stagnation"] == 600
    records = epoch_records([5.0] * 5, [4.0] * 5, **{"val/caption_accuracy": [0.1, 0.2, 0.3, 0.4, 0.5],
                                                      "val/caption_perplexity": [30.0, 20.0, 21.0, 22.0, 23.0]})
    assert fired(records)["caption_stagnation"] == 500  # perplexity's best 20.0 not beaten for 3 epochs


def test_loss_dominance_uses_the_weighted_share():
    # 0.5 + 20 + 0.5 * 1 = 21: caption is 95% of the weighted total.
    records = healthy(loss_caption=[20.0] * 40, loss_alignment=[1.0] * 40)
    assert fired(records)["loss_dominance"] == 50
    # The same losses with caption weighted 0.1: 2.0 of 3.0, not dominant.
    ctx = RunContext({**WEIGHTS, "loss_caption": 0.1})
    assert "loss_dominance" not in fired(records, ctx)


def test_gpu_memory_high_or_low_and_no_gpu_no_finding():
    mem = [82.0] * 40
    mem[17] = 95.0
    assert fired(healthy(**{"hw/max/gpu_memory_percent": mem}))["gpu_memory"] == 180
    finding = diagnose(History.from_records(healthy(**{"hw/max/gpu_memory_percent": [20.0] * 40})), T, CTX)
    assert [(f.rule, f.step, f.severity) for f in finding] == [("gpu_memory", 50, "info")]
    cpu_only = [{k: v for k, v in r.items() if k != "hw/max/gpu_memory_percent"} for r in healthy()]
    assert fired(cpu_only) == {}


@pytest.mark.parametrize("inclusive", [True, False])
def test_rolling_median_matches_numpy_nanmedian(inclusive):
    """The rules' sort-based rolling median against the naive one, window by window: np.nanmedian
    (NaN skipped, ±inf kept as values, an all-NaN window NaN) and the count of finite values."""
    from mmtrain.diagnostics.rules import _rolling_median

    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.normal(size=int(rng.integers(0, 40)))
        for special in (np.nan, np.inf, -np.inf):
            values[rng.random(values.size) < 0.15] = special
        for window in (1, 2, 5, 10):
            medians, counts = _rolling_median(values, window, inclusive)
            for i in range(values.size):
                seen = values[max(0, i - window + 1):i + 1] if inclusive else values[max(0, i - window):i]
                kept = seen[~np.isnan(seen)]
                with np.errstate(invalid="ignore"):  # -inf and +inf as the middle pair: NaN
                    expected = float(np.median(kept)) if kept.size else math.nan
                assert counts[i] == np.isfinite(seen).sum()
                assert (math.isnan(medians[i]) and math.isnan(expected)) or medians[i] == expected


def test_data_wait_and_straggler_use_the_rolling_median():
    wait = [0.02] * 10 + [0.3] * 30
    # The median of the last 20 records passes 10% once half of them are 0.3 (index 19: (0.02 + 0.3) / 2).
    assert fired(healthy(**{"hw/max/data_wait_fraction": wait}))["data_wait"] == 200
    assert "data_wait" not in fired(healthy(**{"hw/max/data_wait_fraction": [0.09, 0.09, 0.5] * 14}), window=5)
    # A CPU run (no GPU readings): judged while the host has idle cores, not once every core is busy.
    cpu_run = [{k: v for k, v in r.items() if k != "hw/max/gpu_memory_percent"}
               for r in healthy(**{"hw/max/data_wait_fraction": wait})]
    assert fired(cpu_run)["data_wait"] == 200
    for r in cpu_run:
        r["system_cpu_percent"] = 97.0
    assert "data_wait" not in fired(cpu_run)
    # On a GPU the wait idles the device, however busy the host is.
    gpu_run = healthy(**{"hw/max/data_wait_fraction": wait, "system_cpu_percent": [97.0] * 40})
    assert fired(gpu_run)["data_wait"] == 200
    slowest = [0.1] * 10 + [0.15] * 30  # over the mean of all ranks, 0.1
    two_ranks = RunContext(WEIGHTS, world_size=2)
    assert fired(healthy(**{"hw/max/step_time": slowest}), two_ranks)["straggler"] == 200
    assert "straggler" not in fired(healthy(**{"hw/max/step_time": slowest}))  # one rank
    # max/min would be 1.43 here (one rank 30% faster than seven others); max/mean is 1.04: no straggler.
    assert "straggler" not in fired(healthy(**{"hw/max/step_time": [0.1] * 40,
                                               "hw/mean/step_time": [0.09625] * 40}), two_ranks)


def test_nonfinite_steps_from_events_or_a_nan_loss():
    records = healthy()
    records.insert(5, {"step": 55, "nonfinite_step": 1, "nonfinite_steps": 1})
    assert fired(records)["nonfinite_steps"] == 55
    losses = [5.0] * 40
    losses[8] = math.nan
    assert fired(healthy(total_loss=losses))["nonfinite_steps"] == 90


def problem_records() -> list[dict]:
    """A history where most rules fire, at different steps, training and epoch records interleaved."""
    norms = [3.0] * 60
    norms[30] = 80.0
    mean = [0.05] * 40 + [2.0] * 20
    records = healthy(60, grad_norm=norms, latent_mean=mean, **{"hw/max/data_wait_fraction": [0.01] * 45 + [0.5] * 15})
    train = [5.0, 4.0, 3.0, 2.5, 2.0, 1.5]
    val = [4.5, 3.9, 3.5, 3.4, 3.45, 3.5]
    for r in epoch_records(train, val, **{"val/caption_accuracy": [0.1, 0.2, 0.2, 0.2, 0.2, 0.2]}):
        line = next(x for x in records if x["step"] == r["step"])
        line.update(r)
    return records


def monitor_findings(records: list[dict], ctx: RunContext = CTX, t: DiagnosticsConfig = T) -> dict[str, int]:
    seen = []
    monitor = DiagnosticsMonitor(t, ctx, seen.append)
    for r in records:
        monitor.observe({k: v for k, v in r.items() if k != "step"}, r["step"])
    return {f.rule: f.step for f in seen}


def test_a_tail_judges_only_where_its_look_back_is_whole():
    """A burst of slow data loading mid-run, and a spike after a high plateau, that the whole history
    does not flag: the monitor, which keeps only a tail, must not flag them either."""
    burst = [{"step": s, "data_wait_fraction": 0.5 if 16 <= s <= 20 else 0.0} for s in range(1, 60)]
    norms = [100.0] * 15 + [1.0] * 5 + [50.0] * 40
    spike = [{"step": i + 1, "grad_norm": v} for i, v in enumerate(norms)]
    for records in (burst, spike):
        assert fired(records) == {} and monitor_findings(records) == {}


def test_the_monitor_remembers_the_lowest_loss_its_tail_dropped():
    losses = [10.0, 3.0, 1.0, 0.3, 0.1] + [0.5] * 30 + [1.5]  # 1.5 > 10 x 0.1, 31 records after it
    records = [{"step": i + 1, "total_loss": v} for i, v in enumerate(losses)]
    assert fired(records) == monitor_findings(records) == {"gradient_explosion": 36}


def test_rules_align_series_by_step():
    """A record without one of the series a rule pairs up: the pairs still match by step."""
    records = healthy(loss_caption=[20.0] * 40, loss_alignment=[1.0] * 40)
    del records[3]["loss_image"]  # step 40: the fifth record with all three is step 60
    assert fired(records)["loss_dominance"] == 60 == monitor_findings(records)["loss_dominance"]
    records = healthy(latent_mean=[0.05] * 10 + [1.5] * 30)
    del records[12]["latent_std"]
    assert fired(records)["latent_drift"] == 160 == monitor_findings(records)["latent_drift"]


def test_the_monitor_and_the_offline_pass_agree_on_random_histories():
    """Spikes, bursts, plateaus, NaNs and missing values at random: the record-by-record monitor
    with its tails names the same rules at the same steps as the whole history."""
    rng = np.random.default_rng(1)
    schedule = LrSchedule(1e-3, 0.0, 5, 800)
    ctx = RunContext(WEIGHTS, schedule, world_size=2)
    compared = 0
    for _ in range(40):
        n = int(rng.integers(20, 80))
        records = healthy(n)
        for i, r in enumerate(records):
            r["learning_rate"] = schedule.at(r["step"])
            r["hw/max/step_time"] = 0.1 * (1.5 if rng.random() < 0.4 else 1.0)
            r["hw/max/data_wait_fraction"] = 0.3 if rng.random() < 0.35 else 0.02
            r["grad_norm"] *= 20.0 if rng.random() < 0.04 else 1.0
            r["total_loss"] *= 12.0 if rng.random() < 0.03 else 1.0
            r["latent_mean"] = 2.0 if rng.random() < 0.5 else 0.05
            if rng.random() < 0.05:
                r["grad_max"] = math.nan
            if rng.random() < 0.05:
                del r["latent_std"]
            if i % 7 == 6:
                e = i // 7
                r.update({"epoch_train_loss_avg": 5.0 - 0.5 * e, "val/total_loss": 4.0 - 0.1 * e * rng.random(),
                          "val/caption_accuracy": rng.random()})
        offline = fired(records, ctx)
        assert monitor_findings(records, ctx) == offline
        compared += len(offline)
    assert compared > 80  # the histories do make rules fire


def test_lr_schedule_follows_a_resume_that_changed_the_schedule_and_fp16_skips():
    """Steps logged before a resume with more epochs followed the shorter schedule; a step the fp16
    loss scaler skipped did not advance the schedule. Neither is a finding; a real deviation is."""
    short, long = LrSchedule(1e-3, 0.0, 0, 100), LrSchedule(1e-3, 0.0, 0, 200)
    records = [{"step": s, "learning_rate": short.at(s), "total_optimizer_steps": 100} for s in range(10, 51, 10)]
    records += [{"step": s, "learning_rate": long.at(s), "total_optimizer_steps": 200} for s in range(60, 201, 10)]
    ctx = RunContext(WEIGHTS, long)
    assert "lr_schedule" not in fired(records, ctx)
    assert "lr_schedule" not in monitor_findings(records, ctx)
    records[8]["total_optimizer_steps"] = 100  # a record claiming the old schedule with the new rates
    assert fired(records, ctx)["lr_schedule"] == 90
    # fp16: 3 skipped steps in the window ending at step 30 (before or at it), none later.
    s = LrSchedule(1e-3, 0.0, 0, 60)
    records = [{"step": 10, "learning_rate": s.at(10), "skipped_steps": 0},
               {"step": 20, "learning_rate": s.at(20), "skipped_steps": 0},
               {"step": 30, "learning_rate": s.at(28), "skipped_steps": 3},
               {"step": 40, "learning_rate": s.at(37), "skipped_steps": 0}]
    assert "lr_schedule" not in fired(records, RunContext(WEIGHTS, s))
    records[3]["learning_rate"] = s.at(40)  # as if the skips had advanced the schedule after all
    assert fired(records, RunContext(WEIGHTS, s))["lr_schedule"] == 40


def test_summary_json_stays_valid_json_with_non_finite_evidence(tmp_path):
    from mmtrain.loggers.jsonl import JsonlLogger

    sink = JsonlLogger(tmp_path)
    sink.summary({"findings": [{"evidence": {"latent_std": math.nan, "x": math.inf}}]})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["findings"][0]["evidence"] == {"latent_std": None, "x": 1e308}


def test_the_training_monitor_names_what_the_offline_pass_names():
    """Record by record with bounded tails (the monitor) or the whole history at once (the report):
    the same rules fire at the same steps."""
    records = problem_records()
    offline = {f.rule: f.step for f in diagnose(History.from_records(records), T, CTX)}
    assert len(offline) >= 5
    seen = []
    monitor = DiagnosticsMonitor(T, CTX, seen.append)
    events = {}
    for r in records:
        events[r["step"]] = monitor.observe({k: v for k, v in r.items() if k != "step"}, r["step"])
    assert {f.rule: f.step for f in seen} == offline
    assert [f["rule"] for f in monitor.findings()] == sorted(offline, key=lambda k: (offline[k], k))
    for f in seen:  # each logged once, at its own step, with its evidence
        assert events[f.step][f"diagnostics/{f.rule}"] == 1.0
        assert sum(f"diagnostics/{f.rule}" in e for e in events.values()) == 1
    assert max(len(d) for d in monitor._values.values() if d.maxlen) <= monitor._tail


def test_a_restored_monitor_does_not_repeat_a_finding_and_keeps_its_tail():
    records = problem_records()
    first, second = [], []
    a = DiagnosticsMonitor(T, CTX, first.append)
    for r in records[:35]:
        a.observe(r, r["step"])
    state = json.loads(json.dumps(a.state_dict()))  # it travels in train_state.json
    b = DiagnosticsMonitor(T, CTX, second.append)
    b.load_state_dict(state)
    for r in records[35:]:
        b.observe(r, r["step"])
    whole = {f.rule: f.step for f in diagnose(History.from_records(records), T, CTX)}
    assert {f.rule for f in first} & {f.rule for f in second} == set()
    assert {f["rule"]: f["step"] for f in b.findings()} == whole


def test_loggers_observe_logs_the_event_at_the_same_step_to_every_sink():
    class Sink(BaseLogger):
        def __init__(self, name):
            self.name, self.lines = name, []

        def log(self, record, step):
            self.lines.append((step, dict(record)))

    sinks = [Sink("a"), Sink("b")]
    loggers = Loggers(sinks)
    loggers.open({}, None)
    loggers.observe(lambda record, step: {"event": 1.0} if record.get("x", 0) > 1 else {})
    loggers.log({"x": 0.5}, step=1)
    loggers.log({"x": 2.0}, step=2)
    for sink in sinks:
        assert sink.lines == [(1, {"x": 0.5}), (2, {"x": 2.0}), (2, {"event": 1.0})]


def test_event_record_is_scalars_only():
    finding = diagnose(History.from_records(healthy(latent_std=[1.0] * 5 + [1e-4] * 35)), T, CTX)[0]
    assert event(finding) == {"diagnostics/latent_collapse": 1.0, "diagnostics/latent_collapse/latent_std": 1e-4,
                              "diagnostics/latent_collapse/threshold": 1e-3}


def test_every_rule_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for rule in RULES:
        assert f"`{rule}`" in readme, rule


def test_loss_weight_fields_follow_the_naming_the_rules_read():
    """RunContext reads each component's weight as model.<name>_loss_weight for loss_<name>."""
    from mmtrain.model import LOSS_COMPONENTS

    for name, (_, _, weight_field) in LOSS_COMPONENTS.items():
        assert weight_field == f"{name.removeprefix('loss_')}_loss_weight"


# --------------------------------------------------------------------------------- real runs


def _train(tmp_path, capsys, name, **overrides):
    from mmtrain.trainer import Trainer

    reset_accelerate()
    out = tmp_path / name
    cfg = tiny_config(out, **{"wandb.mode": "offline", "wandb.log_frequency": 1, "wandb.media_samples": 0,
                              "train.progress_bar": False, **overrides})
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    return out, printed, summary


def _assert_reported_once(out, printed, summary, rule):
    """Printed once, one event line in metrics.jsonl at the finding's step, a W&B alert, and in
    summary.json; and diagnose_run on the run's own files names the same step."""
    import yaml

    finding = next(f for f in summary["findings"] if f["rule"] == rule)
    assert printed.count(f"mmtrain: diagnostics: {finding['message']}") == 1
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if f"diagnostics/{rule}" in r]
    assert [r["step"] for r in lines] == [finding["step"]]
    [run_file] = offline_runs(out)
    alerts = read_run(run_file)["alerts"]
    assert [a["title"] for a in alerts].count(f"mmtrain: {rule}") == 1
    offline = diagnose_run(read_jsonl(out / "metrics.jsonl"), yaml.safe_load((out / "config.yaml").read_text()))
    assert {f.rule: f.step for f in offline}[rule] == finding["step"]
    return finding


@pytest.mark.slow
def test_an_absurd_learning_rate_is_reported_as_an_explosion(tmp_path, capsys):
    out, printed, summary = _train(tmp_path, capsys, "lr", **{"optim.lr": 3.0, "train.epochs": 1})
    finding = _assert_reported_once(out, printed, summary, "gradient_explosion")
    assert finding["evidence"]["total_loss"] > finding["evidence"]["threshold"]


@pytest.mark.slow
def test_unbalanced_loss_weights_are_reported_as_dominance(tmp_path, capsys):
    out, printed, summary = _train(tmp_path, capsys, "weights", **{"model.caption_loss_weight": 20.0,
                                                                    "train.epochs": 1})
    finding = _assert_reported_once(out, printed, summary, "loss_dominance")
    assert "loss_caption" in finding["message"] and finding["evidence"]["share"] >= 0.9


@pytest.mark.slow
def test_a_tiny_train_set_is_reported_as_overfitting_and_a_healthy_run_is_silent(tmp_path, capsys):
    out, printed, summary = _train(tmp_path, capsys, "small", **{"data.synthetic_train_size": 16,
                                                                  "train.epochs": 8})
    _assert_reported_once(out, printed, summary, "overfitting")
    # The same model on the whole tiny set, 2 epochs: nothing fires. The tiny model's steps take
    # milliseconds, so data loading is a real share of them, with cores to spare on a busy test
    # machine or not; data_wait is left out here and judged on the README's main job.
    out, printed, summary = _train(tmp_path, capsys, "healthy", **{"diagnostics.data_wait_share": 0.9})
    assert summary["findings"] == []
    assert "diagnostics" not in printed
    assert not any(k.startswith("diagnostics/") for r in read_jsonl(out / "metrics.jsonl") for k in r)


@pytest.mark.slow
def test_a_resumed_run_does_not_repeat_a_finding(tmp_path, capsys):
    """Stopped after the explosion fired (at step 2; checkpoint at step 3), continued from the checkpoint: the
    finding is in the summary once, with its event line once, and not printed again."""
    from mmtrain.trainer import Trainer

    overrides = {"optim.lr": 3.0, "train.epochs": 1, "wandb.mode": "disabled", "wandb.log_frequency": 1,
                 "wandb.media_samples": 0, "train.progress_bar": False, "checkpoint.every_steps": 3}
    out = tmp_path / "resumed"
    trainer = Trainer(tiny_config(out, **overrides))
    trainer.train_epoch(0, stop_at=4)
    trainer.loggers.close()
    assert "gradient explosion" in capsys.readouterr().out
    reset_accelerate()
    assert (out / "checkpoints" / "step_00000003").is_dir()
    trainer = Trainer(tiny_config(out, **overrides, **{"train.resume": "auto"}))
    assert trainer.resume_from is not None
    trainer.fit()
    assert "gradient explosion" not in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [f["rule"] for f in summary["findings"]].count("gradient_explosion") == 1
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if "diagnostics/gradient_explosion" in r]
    assert len(lines) == 1
