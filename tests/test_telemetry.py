"""Telemetry: every metric against a naive reference, gradient norms, and a real 2-process gather."""

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_jsonl, tiny_config
from expected_metrics import EPOCH_METRICS, WINDOW_METRICS, assert_every_metric
from wandb_files import offline_runs

from mmtrain.metrics import (
    GRAD_FIELDS,
    MAX_FIELDS,
    SUM_FIELDS,
    grad_stats,
    retrieval_recall,
    sample_stats,
    summarize,
    summarize_grads,
)
from mmtrain.trainer import Trainer
from mmtrain.windows import Window, Windows

# ----------------------------------------------------------------------------- pure functions


def _fixture(seed=0, b=4, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 2, 3, 3, generator=g)
    recon = torch.rand(b, 2, 3, 3, generator=g)
    latent = torch.randn(b, 5, generator=g)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    lengths = [7, 5, 3, 6][:b]
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    return images, recon, latent, logits, ids, mask


def test_sample_stats_and_summary_match_naive_loops():
    images, recon, latent, logits, ids, mask = _fixture()
    sums, maxes = sample_stats(images, recon, latent, logits, ids, mask)
    got = summarize(dict(zip(SUM_FIELDS, sums.sum(0).tolist(), strict=True)),
                    dict(zip(MAX_FIELDS, maxes.amax(0).tolist(), strict=True)))
    lat = latent.flatten().tolist()
    mean = sum(lat) / len(lat)
    assert got["latent_mean"] == pytest.approx(mean)
    assert got["latent_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in lat) / len(lat)))
    assert got["latent_min"] == min(lat) and got["latent_max"] == max(lat)
    assert got["latent_norm"] == pytest.approx(sum(math.sqrt(sum(x * x for x in row)) for row in latent.tolist()) / 4)
    diffs = [r - x for r, x in zip(recon.flatten().tolist(), images.flatten().tolist(), strict=True)]
    assert got["image_mse"] == pytest.approx(sum(d * d for d in diffs) / len(diffs))
    assert got["image_diff"] == pytest.approx(sum(abs(d) for d in diffs) / len(diffs))
    assert got["image_l1"] == pytest.approx(sum(abs(d) for d in diffs) / 4)  # per-image L1 distance
    assert got["image_diff_max"] == pytest.approx(max(abs(d) for d in diffs))
    ce = ent = correct = tokens = 0.0
    for i in range(4):
        for pos in range(6):
            if not mask[i, pos + 1]:
                continue
            row = logits[i, pos].tolist()
            z = sum(math.exp(x) for x in row)
            probs = [math.exp(x) / z for x in row]
            target = int(ids[i, pos + 1])
            ce += -math.log(probs[target])
            ent += -sum(p * math.log(p) for p in probs)
            correct += float(max(range(len(row)), key=row.__getitem__) == target)
            tokens += 1
    assert got["caption_accuracy"] == pytest.approx(correct / tokens)
    assert got["caption_perplexity"] == pytest.approx(math.exp(ce / tokens), rel=1e-5)
    assert got["caption_entropy"] == pytest.approx(ent / tokens, rel=1e-5)


def test_window_rows_add_up_across_batches():
    """Summing rows of two halves equals the rows of the whole batch: windows are exact."""
    whole = sample_stats(*_fixture())
    halves = [sample_stats(*(x[i:i + 2] for x in _fixture())) for i in (0, 2)]
    assert torch.allclose(whole[0].sum(0), halves[0][0].sum(0) + halves[1][0].sum(0))
    assert torch.equal(whole[1].amax(0), torch.maximum(halves[0][1].amax(0), halves[1][1].amax(0)))


def test_grad_stats_match_per_parameter_python_sums():
    g = torch.Generator().manual_seed(1)
    grads = {"a": [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)], "b": [torch.randn(2, 2, generator=g)],
             "c": []}
    row, per_module = grad_stats(grads)
    values = [x for gs in grads.values() for t in gs for x in t.flatten().tolist()]
    row = {k: v.item() for k, v in row.items()}
    assert list(row) == list(GRAD_FIELDS)
    got = summarize_grads(row)
    mean_signed = sum(values) / len(values)
    assert got["grad_mean"] == pytest.approx(sum(abs(x) for x in values) / len(values))
    assert got["grad_std"] == pytest.approx(math.sqrt(sum((x - mean_signed) ** 2 for x in values) / len(values)))
    assert got["grad_max"] == pytest.approx(max(abs(x) for x in values))
    assert list(per_module) == list(grads)
    for name, sq in per_module.items():
        assert sq.item() == pytest.approx(sum(x * x for t in grads[name] for x in t.flatten().tolist()))
    assert summarize_grads(row, scale=2.0)["grad_max"] == \
        pytest.approx(2 * got["grad_max"])


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    n = 12
    img = torch.randn(n, 6, generator=g)
    txt = img + 0.9 * torch.randn(n, 6, generator=g)
    ids = torch.randint(0, 4, (n, 3), generator=g)
    ids[5] = ids[2]  # a repeated caption
    got = {k: v.item() for k, v in retrieval_recall(img, txt, ids, ks=(1, 3), chunk=5).items()}

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    same = [[torch.equal(ids[i], ids[j]) for j in range(n)] for i in range(n)]
    for name, q, k in (("i2t", img, txt), ("t2i", txt, img)):
        for top in (1, 3):
            hits = 0
            for i in range(n):
                order = sorted(range(n), key=lambda j: -cos(q[i], k[j]))[:top]
                hits += any(same[i][j] for j in order)
            assert got[f"{name}_R@{top}"] == pytest.approx(hits / n), (name, top)


# ------------------------------------------------------------------------------- in a trainer


def test_grad_norm_is_the_pre_clip_total_norm(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 4, "wandb.log_frequency": 1,
                                               "wandb.mode": "disabled", "optim.max_grad_norm": 0.5}))
    seen = []
    original = trainer.accelerator.clip_grad_norm_
    model = trainer.accelerator.unwrap_model(trainer.model)

    def spy(parameters, max_norm, *args, **kwargs):
        params = list(parameters)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        seen.append(grads)
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", spy)
    trainer.fit()
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "grad_norm" in r]
    assert len(records) == len(seen) == 4
    for record, grads in zip(records, seen, strict=True):
        total = torch.nn.utils.get_total_norm(list(grads.values())).item()
        assert record["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert record["grad_norm_clipped"] == pytest.approx(min(total, 0.5), rel=1e-4)
        assert record["clip_fraction"] == (1.0 if total > 0.5 else 0.0)
        for module in ("image_encoder", "image_decoder", "caption_decoder", "alignment"):
            manual = math.sqrt(sum(float(g.double().pow(2).sum()) for n, g in grads.items()
                                   if n.startswith(module + ".")))
            assert record[f"grad_norm/{module}"] == pytest.approx(manual, rel=1e-4), module
        flat = torch.cat([g.flatten() for g in grads.values()]).double()
        assert record["grad_max"] == pytest.approx(flat.abs().max().item(), rel=1e-4)
        assert record["grad_mean"] == pytest.approx(flat.abs().mean().item(), rel=1e-4)
        assert record["grad_std"] == pytest.approx(flat.std(unbiased=False).item(), rel=1e-4)


def test_single_process_run_logs_every_metric(tmp_path):
    Trainer(tiny_config(tmp_path, **{"wandb.log_frequency": 1, "wandb.image_log_frequency": 3})).fit()
    records, run = assert_every_metric(tmp_path)
    assert not [k for k in WINDOW_METRICS if k not in records[0]]
    assert not [k for k in EPOCH_METRICS if k not in records[5]]
    history_keys = set().union(*run["history"])
    # W&B stores a media value as a dict, flattened into "<key>/_type", "<key>/path", ...
    assert {"media/reconstructions/_type", "media/captions/_type"} <= history_keys
    grid = next(r["media/reconstructions"] for r in records if "media/reconstructions" in r)
    assert (tmp_path / grid["path"]).is_file()
    table = json.loads((tmp_path / records[5]["media/captions"]["path"]).read_text())
    assert table["columns"] == ["image", "ground_truth", "generated"] and len(table["data"]) == 8
    assert (tmp_path / table["data"][0][0]["path"]).is_file()
    assert table["data"][0][1].startswith("an engraving of")


@pytest.mark.parametrize("mode", ["log_steps", "every_step"])
def test_sample_metrics_pool_the_micro_batches_the_mode_names(tmp_path, monkeypatch, mode):
    """wandb.sample_metrics: a record's latent/image/caption metrics are those of the log step's
    micro-batches (log_steps; the epoch summary adds the epoch's last step) or of every micro-batch
    of the window (every_step), checked against the rows of exactly those micro-batches."""
    import mmtrain.telemetry as telemetry_module

    # 6 batches of 16 per epoch, 2 per optimizer step: steps 1-3 and 4-6; log steps 2, 4, 6.
    trainer = Trainer(tiny_config(tmp_path, **{"train.gradient_accumulation_steps": 2, "wandb.log_frequency": 2,
                                               "wandb.mode": "disabled", "wandb.media_samples": 0,
                                               "wandb.sample_metrics": mode}))
    rows: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []

    def spy(*args):
        out = sample_stats(*args)
        rows.append((trainer.state.optimizer_step + 1, out))
        return out

    monkeypatch.setattr(telemetry_module, "sample_stats", spy)
    trainer.fit()

    def expected(steps):
        picked = [r for step, r in rows if step in steps]
        return summarize(dict(zip(SUM_FIELDS, sum(s.sum(0) for s, _ in picked).tolist(), strict=True)),
                         dict(zip(MAX_FIELDS, torch.stack([m.amax(0) for _, m in picked]).amax(0).tolist(),
                                  strict=True)))

    every = mode == "every_step"
    assert sorted({step for step, _ in rows}) == ([1, 2, 3, 4, 5, 6] if every else [2, 3, 4, 6])
    assert len(rows) == (12 if every else 8)  # two micro-batches per step
    records = read_jsonl(tmp_path / "metrics.jsonl")
    windows = {r["optimizer_step"]: r for r in records if "latent_std" in r}
    assert sorted(windows) == [2, 4, 6]
    for step, record in windows.items():
        want = expected({step - 1, step} if every else {step})
        for name in ("latent_std", "latent_max", "image_mse", "image_diff_max", "caption_accuracy",
                     "caption_entropy"):
            assert record[name] == pytest.approx(want[name], rel=1e-9), (step, name)
    epochs = [r for r in records if "latent_std_trend" in r]
    assert len(epochs) == 2
    for record, steps in zip(epochs, ({1, 2, 3}, {4, 5, 6}) if every else ({2, 3}, {4, 6}), strict=True):
        assert record["latent_std_trend"] == pytest.approx(expected(steps)["latent_std"], rel=1e-9)


# ------------------------------------------------------------------------- two real processes


@pytest.mark.slow
def test_two_processes_gather_exact_cross_rank_values(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes",
                           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(Path(__file__).with_name("two_rank_spy.py")), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    window_calls = [i for i, parts in enumerate(ranks[0]) if "hw" in parts]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "total_loss" in r]
    assert len(window_calls) == len(records) == 4
    assert len(offline_runs(out)) == 1
    for call, record in zip(window_calls, records, strict=True):
        rows = [ranks[r][call] for r in (0, 1)]
        per_rank_loss = [row["loss"]["total_loss"] / row["counts"]["samples"] for row in rows]
        assert per_rank_loss[0] != per_rank_loss[1]  # the ranks saw different data
        assert record["total_loss"] == pytest.approx(sum(per_rank_loss) / 2, rel=1e-9)
        lat_max = [row["maxes"]["latent_max"] for row in rows]
        lat_min = [-row["maxes"]["latent_neg_min"] for row in rows]
        assert record["latent_max"] == max(lat_max) and record["latent_min"] == min(lat_min)
        assert lat_max[0] != lat_max[1] or lat_min[0] != lat_min[1]
        for r in (0, 1):
            assert record[f"hw/rank{r}/rss_mb"] == rows[r]["hw"]["rss_mb"]


def test_window_clock_counts_training_time_only():
    window = Window(torch.device("cpu"))
    assert not window.running and window.elapsed() == 0.0  # built paused: set-up is not step time
    window.resume()
    time.sleep(0.05)
    window.pause()
    first = window.elapsed()
    time.sleep(0.05)  # paused: validation, a checkpoint write
    assert window.elapsed() == first and 0.04 < first < 0.5
    windows = Windows(torch.device("cpu"))
    windows.resume()
    with windows.paused():
        assert not windows.log.running and not windows.epoch.running
    assert windows.log.running and windows.epoch.running  # back to running: it was
    windows.pause()
    with windows.paused():
        pass
    assert not windows.log.running  # stays paused: it was
    state = windows.log.state_dict()
    restored = Window(torch.device("cpu"))
    restored.load_state_dict(state)
    assert not restored.running and restored.elapsed() == pytest.approx(state["elapsed"])  # resumes paused


def test_first_window_step_time_leaves_out_set_up(tmp_path):
    # Before: the first window's clock started when the Trainer was built, so W&B's start-up (and
    # here, a 5 s pause before fit) was logged as step time.
    trainer = Trainer(tiny_config(tmp_path, **{"wandb.log_frequency": 2, "wandb.mode": "disabled",
                                               "wandb.media_samples": 0}))
    time.sleep(5.0)
    trainer.fit()
    first = next(r for r in read_jsonl(tmp_path / "metrics.jsonl") if "step_time" in r)
    assert first["step_time"] * 2 < 2.5, first  # two tiny steps: ~0.1 s, a few times that on a busy machine
