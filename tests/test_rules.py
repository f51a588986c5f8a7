"""Rules from the README glossary and the Training section, each with an input that exercises it.

Every test here compares against values computed independently (numbers written out, or a naive
reference in the test), on inputs chosen so that a plausible wrong implementation gives another
answer: a duplicate caption ranked *above* the true pair, micro-batch counts that do not divide by
the accumulation, loss weights that are all different, ranks with different sample and token
counts, windows with micro-batches of different sizes. All fast and in process.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, reset_accelerate, tiny_config

from mmtrain.distributed import gather_named
from mmtrain.metrics import retrieval_recall, sample_stats
from mmtrain.model import loss_names
from mmtrain.optim import optimizer_steps
from mmtrain.telemetry import RANK_KEYS, hardware_record
from mmtrain.windows import Window, combine

# ------------------------------------------------------------------ retrieval: identical captions

# Four pairs in 3-D. Captions 0 and 2 are the same token ids ("A"); 1 is "B", 3 is "C".
# Image 0's most similar caption is caption 2 (the twin of its own), ranked above caption 0;
# caption 0's most similar image is image 2, which carries the same caption. The README counts
# both as hits ("Identical captions (same token ids) count as the same caption"); matching by
# index alone would not.
_IMAGES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]]
_TEXTS = [[0.8, 0.0, 0.6], [0.0, 0.6, 0.8], [1.0, 0.0, 0.05], [0.0, 1.0, 0.1]]
_CAPTIONS = [[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2]]
# Rankings (most similar first), worked out from the cosines:
#   i2t  image 0: 2 0 ..   image 1: 3 1 ..   image 2: 0 1 ..   image 3: 1 3 ..
#   t2i  caption 0: 2 0 .. caption 1: 3 2 .. caption 2: 0 2 .. caption 3: 1 3 ..
# With the identical-caption rule: i2t R@1 = {0, 2} of 4, R@2 = all 4; t2i R@1 = {0, 2}, R@2 = {0, 2, 3}.
# By index only it would be: i2t R@1 = 0, R@2 = 3/4; t2i R@1 = 0, R@2 = 3/4.
_EXPECTED_RECALL = {"i2t_R@1": 0.5, "i2t_R@2": 1.0, "t2i_R@1": 0.5, "t2i_R@2": 0.75}


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_counts_a_twin_caption_ranked_above_the_true_pair(chunk):
    got = retrieval_recall(torch.tensor(_IMAGES), torch.tensor(_TEXTS), torch.tensor(_CAPTIONS), ks=(1, 2),
                           chunk=chunk)
    assert {k: v.item() for k, v in got.items()} == pytest.approx(_EXPECTED_RECALL, abs=1e-9)


def test_retrieval_a_different_caption_ranked_first_is_a_miss():
    """The rule is about identical token ids only: with caption 2 made different, image 0 and
    caption 0 (and image 2, caption 2) lose their rank-1 hits."""
    captions = [row[:] for row in _CAPTIONS]
    captions[2] = [1, 8, 2]
    got = retrieval_recall(torch.tensor(_IMAGES), torch.tensor(_TEXTS), torch.tensor(captions), ks=(1, 2))
    assert {k: v.item() for k, v in got.items()} == pytest.approx(
        {"i2t_R@1": 0.0, "i2t_R@2": 0.75, "t2i_R@1": 0.0, "t2i_R@2": 0.75}, abs=1e-9)


def _brute_force_recall(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """The glossary's retrieval definition as plain loops (identical token ids = same caption)."""
    n = img.shape[0]

    def cos(a, b):
        return float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))

    same = [[torch.equal(ids[i], ids[j]) for j in range(n)] for i in range(n)]
    out = {}
    for name, q, k in (("i2t", img, txt), ("t2i", txt, img)):
        for top in ks:
            hits = 0
            for i in range(n):
                order = sorted(range(n), key=lambda j, i=i: -cos(q[i], k[j]))[:top]
                hits += any(same[i][j] for j in order)
            out[f"{name}_R@{top}"] = hits / n
    return out


# -------------------------------------------------- optimizer steps: a partial window is a step


@pytest.mark.parametrize(("batches", "accumulation", "epochs", "max_steps", "expected"), [
    (6, 2, 3, 0, (3, 9)),     # divides evenly
    (5, 2, 3, 0, (3, 9)),     # 2 full windows + 1 partial window of 1 micro-batch
    (7, 3, 2, 0, (3, 6)),     # 2 full windows + 1 of 1
    (8, 3, 2, 0, (3, 6)),     # 2 full windows + 1 of 2
    (1, 4, 5, 0, (1, 5)),     # fewer micro-batches than one window: still one step per epoch
    (5, 2, 3, 4, (3, 4)),     # max_steps caps the total, not the per-epoch count
    (5, 2, 3, 100, (3, 9)),   # a cap above the total changes nothing
    (5, 1, 2, 0, (5, 10)),
])
def test_optimizer_steps_count_the_last_partial_window(batches, accumulation, epochs, max_steps, expected):
    assert optimizer_steps(batches, accumulation, epochs, max_steps) == expected


# ----------------------------------------------------------- combine: hand-made rows of 2 ranks

_FAKE_ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)


def _micro_batch(g: torch.Generator, b: int, t: int = 6, v: int = 9) -> dict[str, torch.Tensor]:
    lengths = torch.randint(2, t + 1, (b,), generator=g)  # every caption has >= 1 predicted token
    return {"images": torch.rand(b, 1, 2, 3, generator=g), "recon": torch.rand(b, 1, 2, 3, generator=g),
            "latent": 2 * torch.randn(b, 4, generator=g) + 0.5, "logits": 3 * torch.randn(b, t, v, generator=g),
            "ids": torch.randint(0, v, (b, t), generator=g),
            "mask": (torch.arange(t)[None] < lengths[:, None]).long()}


def _rank_window(batches: list[dict], losses: list[dict], norms: list[float], max_norm: float) -> Window:
    """One rank's window, filled the way the trainer fills it."""
    w = Window(torch.device("cpu"))
    for mb, loss in zip(batches, losses, strict=True):
        stats = sample_stats(mb["images"], mb["recon"], mb["latent"], mb["logits"], mb["ids"], mb["mask"])
        w.add_micro_batch({k: torch.tensor(x) for k, x in loss.items()}, mb["images"].shape[0], stats)
    for norm in norms:
        w.add_optimizer_step(torch.tensor(norm), max_norm)
    return w


def _rows(windows: list[Window]) -> list[dict[str, dict[str, float]]]:
    """The rows gather_named returns on the main process: one per rank, in rank order."""
    return [gather_named(_FAKE_ACCELERATOR, w.columns())[0] for w in windows]


def _naive_pooled(batches: list[dict]) -> dict[str, float]:
    """Every sample of every rank pooled, then the glossary's definitions, as plain Python."""
    lat = [x for mb in batches for x in mb["latent"].flatten().tolist()]
    mean = sum(lat) / len(lat)
    norms = [math.sqrt(sum(x * x for x in row)) for mb in batches for row in mb["latent"].tolist()]
    diffs = [(r - x) for mb in batches
             for r, x in zip(mb["recon"].flatten().tolist(), mb["images"].flatten().tolist(), strict=True)]
    n = sum(mb["images"].shape[0] for mb in batches)
    ce = ent = correct = tokens = 0.0
    for mb in batches:
        for i in range(mb["ids"].shape[0]):
            for pos in range(mb["ids"].shape[1] - 1):
                if not mb["mask"][i, pos + 1]:
                    continue
                row = mb["logits"][i, pos].double()
                log_p = row - torch.logsumexp(row, 0)
                target = int(mb["ids"][i, pos + 1])
                ce += -float(log_p[target])
                ent += -float((log_p.exp() * log_p).sum())
                correct += float(int(row.argmax()) == target)
                tokens += 1
    return {
        "latent_mean": mean, "latent_std": math.sqrt(sum((x - mean) ** 2 for x in lat) / len(lat)),
        "latent_min": min(lat), "latent_max": max(lat), "latent_norm": sum(norms) / n,
        "image_mse": sum(d * d for d in diffs) / len(diffs), "image_l1": sum(abs(d) for d in diffs) / n,
        "image_diff": sum(abs(d) for d in diffs) / len(diffs), "image_diff_max": max(abs(d) for d in diffs),
        "caption_accuracy": correct / tokens, "caption_perplexity": math.exp(ce / tokens),
        "caption_entropy": ent / tokens,
    }


# Per-rank micro-batch sizes. "even": what training produces (same count and size on every rank;
# the data, and so the token counts and values, differ). "uneven": different counts and sizes, so
# that a mean of per-rank means differs from the pooled mean the glossary defines.
_LAYOUTS = {"even": ([5, 5], [5, 5]), "uneven": ([4, 4, 2], [3])}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("max_norm", [1.0, math.inf])
def test_combine_of_two_ranks_equals_the_naive_pooled_values(layout, max_norm):
    g = torch.Generator().manual_seed(11)
    sizes = _LAYOUTS[layout]
    batches = [[_micro_batch(g, b) for b in rank_sizes] for rank_sizes in sizes]
    batches[1] = [{**mb, "latent": mb["latent"] * 3 - 4} for mb in batches[1]]  # rank 1 holds the extremes
    losses = [[{k: float(x) for k, x in zip(loss_names(), torch.rand(4, generator=g) * 5 + 0.1, strict=True)}
               for _ in rank_sizes] for rank_sizes in sizes]
    norms = [0.5, 2.0, 1.25]  # pre-clip norms of the window's optimizer steps (identical on every rank)
    rows = _rows([_rank_window(b, lo, norms, max_norm) for b, lo in zip(batches, losses, strict=True)])
    got = combine(rows)

    every_batch = [mb for rank in batches for mb in rank]
    every_loss = [lo for rank in losses for lo in rank]
    every_size = [size for rank_sizes in sizes for size in rank_sizes]
    # Each micro-batch's loss weighted by its samples: the mean over the window's samples.
    expected = {k: sum(lo[k] * n for lo, n in zip(every_loss, every_size, strict=True)) / sum(every_size)
                for k in loss_names()}
    clip = [min(1.0, max_norm / (n + 1e-6)) for n in norms]
    expected |= {"grad_norm": sum(norms) / 3, "grad_norm_max": 2.0,
                 "grad_norm_clipped": sum(n * c for n, c in zip(norms, clip, strict=True)) / 3,
                 "clip_fraction": sum(n > max_norm for n in norms) / 3}
    expected |= _naive_pooled(every_batch)
    assert set(got) == set(expected)
    assert got == pytest.approx(expected, rel=1e-6)
    if max_norm == 1.0:  # the numbers written out, in case the reference above shares a mistake
        assert (got["grad_norm"], got["clip_fraction"]) == pytest.approx((3.75 / 3, 2 / 3))
        assert got["grad_norm_clipped"] == pytest.approx((0.5 + 1.0 + 1.0) / 3, rel=1e-5)


# ------------------------------------------------------------------- hardware rows across ranks

def _hw_row(**values: float) -> dict[str, dict[str, float]]:
    return {"hw": {k: values.get(k, math.nan) for k in RANK_KEYS}}


def test_hardware_record_on_cpu_rows():
    rows = [_hw_row(cpu_percent=90.0, rss_mb=1000.0, peak_rss_mb=1200.0, step_time=0.2, data_wait_fraction=0.1),
            _hw_row(cpu_percent=50.0, rss_mb=800.0, peak_rss_mb=1500.0, step_time=0.5, data_wait_fraction=0.3),
            _hw_row(cpu_percent=70.0, rss_mb=900.0, peak_rss_mb=600.0, step_time=0.3, data_wait_fraction=0.2)]
    rec = hardware_record(rows)
    assert not [k for k in rec if "gpu" in k or "torch_" in k]  # readings a device lacks are left out, not 0
    assert rec["cpu_percent"] == 90.0 and rec["rss_mb"] == 1000.0  # bare names: rank 0's reading
    assert rec["hw/rank1/cpu_percent"] == 50.0 and rec["hw/rank2/step_time"] == 0.3
    assert rec["hw/max/cpu_percent"] == 90.0 and rec["hw/mean/cpu_percent"] == pytest.approx(70.0)
    assert rec["hw/max/peak_rss_mb"] == 1500.0 and rec["hw/mean/rss_mb"] == pytest.approx(900.0)
    assert rec["hw/imbalance_peak_memory"] == pytest.approx(1500.0 / 600.0)
    assert rec["hw/imbalance_step_time"] == pytest.approx(0.5 / 0.2)


def test_hardware_imbalance_uses_torch_peak_memory_on_gpu():
    rows = [_hw_row(torch_peak_mb=400.0, peak_rss_mb=3000.0, gpu_memory_used=1000.0, step_time=1.0),
            _hw_row(torch_peak_mb=100.0, peak_rss_mb=2900.0, gpu_memory_used=2000.0, step_time=1.0)]
    rec = hardware_record(rows)
    assert rec["hw/imbalance_peak_memory"] == pytest.approx(4.0)
    assert rec["hw/imbalance_step_time"] == pytest.approx(1.0)
    assert rec["gpu_memory_used"] == 1000.0 and rec["hw/mean/gpu_memory_used"] == pytest.approx(1500.0)


# --------------------------------------------- one tiny run: loss weights, partial windows, epoch

# 36 train samples in micro-batches of 8: 5 per epoch, the last one of 4 samples; accumulation 2:
# optimizer steps of 2, 2 and 1 micro-batches, so 3 steps per epoch (rounded up), 6 in 2 epochs.
# Loss weights all different; 20 val samples evaluated in batches of 6, 6, 6 and 2.
WEIGHTS = {"model.image_loss_weight": 0.3, "model.caption_loss_weight": 1.7, "model.alignment_loss_weight": 2.5}
RUN = {**WEIGHTS, "data.synthetic_train_size": 36, "data.synthetic_val_size": 20, "train.batch_size": 8,
       "train.gradient_accumulation_steps": 2, "train.epochs": 2, "train.eval_batch_size": 6,
       "wandb.log_frequency": 1, "wandb.mode": "disabled", "wandb.media_samples": 2, "wandb.image_log_frequency": 2,
       "optim.lr": 3e-3,
       "optim.min_lr": 1e-4, "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0}
STEPS_PER_EPOCH, TOTAL_STEPS = 3, 6
SAMPLES = [16, 16, 4]       # per optimizer step within an epoch


def _weighted(record: dict, prefix: str = "") -> float:
    return (0.3 * record[f"{prefix}loss_image"] + 1.7 * record[f"{prefix}loss_caption"]
            + 2.5 * record[f"{prefix}loss_alignment"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mmtrain.trainer import Trainer

    out = tmp_path_factory.mktemp("rules") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads; on a busy machine they cost
    try:
        trainer = Trainer(tiny_config(out, **RUN))
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    val_batches = list(trainer.val_loader)
    trainer.accelerator.end_training()
    reset_accelerate()
    records = read_jsonl(out / "metrics.jsonl")
    return SimpleNamespace(out=out, result=result, model=model, val_batches=val_batches, records=records,
                           train=[r for r in records if "total_loss" in r],
                           epochs=[r for r in records if "val/total_loss" in r])


def test_a_partial_accumulation_window_is_one_more_optimizer_step(run):
    assert [r["step"] for r in run.records] == list(range(1, TOTAL_STEPS + 1))  # one line per step, merged
    assert [r["step"] for r in run.train] == list(range(1, TOTAL_STEPS + 1))
    assert run.result["optimizer_steps"] == TOTAL_STEPS
    assert [r["optimizer_step"] for r in run.train] == list(range(1, TOTAL_STEPS + 1))
    assert [r["epoch"] for r in run.train] == pytest.approx([s / STEPS_PER_EPOCH for s in range(1, 7)], abs=1e-12)
    assert [r["step"] for r in run.epochs] == [3, 6]  # validation after each epoch's last (partial) step
    assert sorted(p.name for p in (run.out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    state = json.loads((run.out / "checkpoints" / "step_00000003" / "train_state.json").read_text())["train_state"]
    assert (state["epoch"], state["batches_in_epoch"], state["samples_seen"]) == (1, 0, 36)


def test_learning_rate_follows_the_schedule_sized_in_optimizer_steps(run):
    """Step k runs at the schedule's value k-1; the last at exactly min_lr; every group alike."""
    lr, min_lr, n = 3e-3, 1e-4, TOTAL_STEPS
    expected = [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / (n - 1))) for k in range(n)]
    assert [r["learning_rate"] for r in run.train] == pytest.approx(expected, rel=1e-9)
    for r in run.train:
        assert r["learning_rate/decay"] == r["learning_rate/no_decay"] == r["learning_rate"]


def test_samples_and_batch_sizes(run):
    per_step = SAMPLES * 2
    assert [r["samples_seen"] for r in run.train] == [sum(per_step[:k]) for k in range(1, 7)]
    assert run.result["samples_seen"] == 72
    for r, samples in zip(run.train, per_step, strict=True):
        assert r["batch_size"] == 8 and r["effective_batch_size"] == 16
        # samples_per_second = window samples / window time; step_time = window time / window steps (1)
        assert r["samples_per_second"] * r["step_time"] == pytest.approx(samples, rel=1e-6)
        assert 0.0 <= r["data_wait_fraction"] <= 1.0


def test_window_total_loss_is_the_weighted_sum_of_its_parts(run):
    for r in run.train:
        assert r["total_loss"] == pytest.approx(_weighted(r), rel=1e-6), r["step"]
        # The same parts under the default weights would give another total: the weights are used.
        assert r["total_loss"] != pytest.approx(r["loss_image"] + r["loss_caption"] + 0.5 * r["loss_alignment"],
                                                rel=1e-3)


def test_window_gradient_values_of_one_step(run):
    for r in run.train:  # one optimizer step per window here
        assert r["grad_norm_max"] == pytest.approx(r["grad_norm"], rel=1e-12)
        assert r["grad_norm_clipped"] == pytest.approx(r["grad_norm"] * min(1.0, 1.0 / (r["grad_norm"] + 1e-6)))
        assert r["clip_fraction"] == float(r["grad_norm"] > 1.0)


def test_val_total_loss_is_the_weighted_sum_of_the_val_parts(run):
    assert len(run.epochs) == 2
    for r in run.epochs:
        assert r["val/total_loss"] == pytest.approx(_weighted(r, "val/"), rel=1e-9)
        assert r["val/loss_alignment"] > 0.01  # its weight matters: 2.5 x this is not lost in rounding


def test_epoch_metrics_against_the_epoch_windows(run):
    """The epoch values from the per-step windows (1 optimizer step of 2, 2, 1 micro-batches each)."""
    for epoch, r in enumerate(run.epochs):
        windows = run.train[STEPS_PER_EPOCH * epoch:STEPS_PER_EPOCH * (epoch + 1)]

        def mean(key, windows=windows):  # over the epoch's samples (micro-batches weighted by their samples)
            return sum(n * w[key] for n, w in zip(SAMPLES, windows, strict=True)) / sum(SAMPLES)

        assert r["epoch_train_loss_avg"] == pytest.approx(mean("total_loss"), rel=1e-9)
        assert r["image_caption_loss_ratio"] == pytest.approx(mean("loss_image") / mean("loss_caption"), rel=1e-9)
        assert r["gradient_norm_trend"] == pytest.approx(sum(w["grad_norm"] for w in windows) / 3, rel=1e-9)
        # latent_std over all the epoch's latent values, pooled from the windows' means and stds
        n = sum(SAMPLES)
        m = sum(s * w["latent_mean"] for s, w in zip(SAMPLES, windows, strict=True)) / n
        second = sum(s * (w["latent_std"] ** 2 + w["latent_mean"] ** 2) for s, w in zip(SAMPLES, windows,
                                                                                        strict=True)) / n
        assert r["latent_std_trend"] == pytest.approx(math.sqrt(second - m * m), rel=1e-6)
        assert r["epoch_val_loss_avg"] == r["val/total_loss"]
        assert r["val_train_loss_ratio"] == pytest.approx(r["val/total_loss"] / r["epoch_train_loss_avg"], rel=1e-12)


def test_run_summary_against_the_log(run):
    summary = json.loads((run.out / "summary.json").read_text())
    vals = [r["val/total_loss"] for r in run.epochs]
    assert summary["final_train_loss"] == run.train[-1]["total_loss"]
    assert summary["final_validation_loss"] == vals[-1]
    assert summary["best_validation_loss"] == min(vals)
    assert summary["best_validation_epoch"] == vals.index(min(vals)) + 1
    assert (summary["optimizer_steps"], summary["samples_seen"]) == (TOTAL_STEPS, 72)
    assert summary["samples_per_second"] == pytest.approx(72 / summary["train_time_seconds"], rel=1e-9)


def test_validation_values_against_a_naive_pass_over_the_whole_split(run):
    """val/loss_image, val/loss_caption, the val/image_*, val/caption_*, val/latent_* metrics and
    retrieval of the final model over all 20 val samples in one pass (the run evaluated them in
    batches of 6, 6, 6, 2: a mean of batch means would differ). val/loss_alignment is left out here:
    it is contrasted within groups, and only its weighting is a rule checked above."""
    batch = {k: torch.cat([b[k] for b in run.val_batches]) for k in run.val_batches[0]}
    assert batch["pixel_values"].shape[0] == 20
    with torch.no_grad():
        _, out = run.model(batch)
    images, recon = batch["pixel_values"].double(), out["reconstruction"].double()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ce = F.cross_entropy(out["logits"][:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    targets = mask[:, 1:].double()
    err = recon - images
    lat = out["latent"].double()
    naive = {
        "loss_image": float(err.pow(2).flatten(1).mean(1).mean()),
        "loss_caption": float((ce * targets).sum() / targets.sum()),   # sum CE / sum tokens over the split
        "image_mse": float(err.pow(2).mean()), "image_l1": float(err.abs().flatten(1).sum(1).mean()),
        "image_diff": float(err.abs().mean()), "image_diff_max": float(err.abs().max()),
        "caption_perplexity": math.exp(float((ce * targets).sum() / targets.sum())),
        "caption_accuracy": float(((out["logits"][:, :-1].argmax(-1) == ids[:, 1:]).double() * targets).sum()
                                  / targets.sum()),
        "latent_mean": float(lat.mean()), "latent_std": float(lat.std(unbiased=False)),
        "latent_min": float(lat.min()), "latent_max": float(lat.max()), "latent_norm": float(lat.norm(dim=1).mean()),
        **_brute_force_recall(out["latent"], out["text_embedding"], ids),
    }
    logged = run.epochs[-1]
    for key, value in naive.items():
        assert logged[f"val/{key}"] == pytest.approx(value, rel=2e-5, abs=1e-7), key
    # The caption loss really is token-weighted here: the mean of the 4 batch means is another number.
    batch_means = [float((ce[i:i + 6] * targets[i:i + 6]).sum() / targets[i:i + 6].sum()) for i in range(0, 20, 6)]
    assert abs(sum(batch_means) / 4 - naive["loss_caption"]) > 1e-4


def test_media_cadence_and_the_same_val_images_every_time(run):
    grids = {r["step"]: r["media/reconstructions"] for r in run.records if "media/reconstructions" in r}
    tables = {r["step"]: r["media/captions"] for r in run.records if "media/captions" in r}
    assert sorted(grids) == [2, 4, 6]  # every wandb.image_log_frequency optimizer steps
    assert sorted(tables) == [3, 6]    # every epoch
    pngs = [np.asarray(PIL.Image.open(run.out / grids[s]["path"])) for s in (2, 6)]
    third = pngs[0].shape[0] // 3
    assert np.array_equal(pngs[0][:third], pngs[1][:third])  # the originals' row: the same images
    assert not np.array_equal(pngs[0][third:], pngs[1][third:])  # the reconstructions changed
    truths = [[row[1] for row in json.loads((run.out / tables[s]["path"]).read_text())["data"]] for s in (3, 6)]
    assert truths[0] == truths[1] and len(truths[0]) == 2


# --------------------------------- a short run: the last step is a log step; clipping 0 = never

# 32 samples in batches of 4, one epoch capped at 4 optimizer steps, a log every 3: windows of
# steps 1-3 and of step 4 (the last step, not a multiple of 3). optim.max_grad_norm 0: never clip.
SHORT = {"data.synthetic_train_size": 32, "data.synthetic_val_size": 8, "train.batch_size": 4, "train.epochs": 1,
         "train.max_steps": 4, "wandb.log_frequency": 3, "wandb.mode": "disabled", "wandb.media_samples": 0,
         "optim.max_grad_norm": 0.0, "optim.warmup_steps": 0}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from mmtrain.trainer import Trainer

    out = tmp_path_factory.mktemp("short") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(tiny_config(out, **SHORT))
        start = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        trainer.fit()
        end = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        moved = max(float((end[k] - start[k]).abs().max()) for k in start)
    finally:
        torch.set_num_threads(threads)
    trainer.accelerator.end_training()
    reset_accelerate()
    return SimpleNamespace(train=[r for r in read_jsonl(out / "metrics.jsonl") if "total_loss" in r], moved=moved)


def test_the_last_step_is_a_log_step(short_run):
    assert [r["step"] for r in short_run.train] == [3, 4]
    assert [r["samples_seen"] for r in short_run.train] == [12, 16]
    assert short_run.train[-1]["learning_rate"] == pytest.approx(1e-4)  # tiny.yaml min_lr, at the last step


def test_step_time_is_per_optimizer_step_of_a_multi_step_window(short_run):
    # samples_per_second = window samples / window time; step_time = window time / window steps
    for r, (samples, steps) in zip(short_run.train, [(12, 3), (4, 1)], strict=True):
        assert r["samples_per_second"] * r["step_time"] * steps == pytest.approx(samples, rel=1e-6)


def test_max_grad_norm_0_never_clips(short_run):
    for r in short_run.train:
        assert r["clip_fraction"] == 0.0
        assert r["grad_norm_clipped"] == pytest.approx(r["grad_norm"], rel=1e-12)
        assert r["grad_norm"] > 0
    assert short_run.moved > 1e-3  # the updates were not clipped away
