"""Gradient accumulation k x batch b matches one batch of k*b from the same seed.

The match is exact in exact arithmetic when every per-sample term is batch-independent and the
batch means weigh samples equally. Two of our losses are not like that, so this test removes
them on purpose: ``loss_alignment`` (InfoNCE) contrasts each sample with the rest of its batch,
and ``loss_caption`` is a mean over the batch's tokens, so captions of equal token count are used.
What is left to differ is float summation order. Stated tolerance: the gradient of the first
optimizer step agrees to 1e-5 of each tensor's largest entry, and the logged losses and gradient
norms of 3 steps agree to 1e-5 relative. (Weights are not compared after AdamW steps: Adam divides
by the gradient's own magnitude, so entries whose true gradient is 0, e.g. attention key biases,
turn float noise into +-lr updates.)
"""

import pytest
from conftest import read_jsonl, reset_accelerate, tiny_config
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from mmtrain.synthetic import SHAPES, generate_split
from mmtrain.trainer import Trainer


@pytest.fixture(scope="module")
def fixed_length_dataset(tmp_path_factory):
    images, _ = generate_split(64, 32, seed=3, split_id=0)
    captions = [f"shape {SHAPES[i % len(SHAPES)]} number {i % 5}" for i in range(64)]
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    path = tmp_path_factory.mktemp("fixed") / "ds"
    DatasetDict({"train": Dataset.from_dict({"image": images[:48], "caption": captions[:48]}, features=features),
                 "validation": Dataset.from_dict({"image": images[48:], "caption": captions[48:]},
                                                 features=features)}).save_to_disk(str(path))
    return path


def _run(out, data_path, batch_size, accumulation, steps=3):
    """Train ``steps`` optimizer steps; return the log and the gradients each optimizer step applied."""
    cfg = tiny_config(out, **{
        "data.source": "disk", "data.path": str(data_path), "train.batch_size": batch_size,
        "train.gradient_accumulation_steps": accumulation, "train.max_steps": steps,
        "model.alignment_loss_weight": 0.0,
        "wandb.mode": "disabled", "wandb.log_frequency": 1, "optim.max_grad_norm": 0.0})
    trainer = Trainer(cfg)
    grads = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()}))
    trainer.fit()
    trainer.accelerator.end_training()
    reset_accelerate()
    return read_jsonl(out / "metrics.jsonl"), grads


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


def test_accumulation_matches_large_batch(tmp_path, fixed_length_dataset):
    big_log, big_grads = _run(tmp_path / "big", fixed_length_dataset, batch_size=16, accumulation=1)
    acc_log, acc_grads = _run(tmp_path / "acc", fixed_length_dataset, batch_size=4, accumulation=4)

    assert len(big_grads) == len(acc_grads) == 3  # one optimizer step per 4 micro-batches
    # Same weights, same 16 samples: the gradient the first step applies is the same.
    assert _max_relative_difference(big_grads[0], acc_grads[0]) < 1e-5
    train_big = [r for r in big_log if "grad_norm" in r]
    train_acc = [r for r in acc_log if "grad_norm" in r]
    assert [r["step"] for r in train_big] == [r["step"] for r in train_acc] == [1, 2, 3]
    for a, b in zip(train_big, train_acc, strict=True):
        for key in ("total_loss", "loss_image", "loss_caption", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        assert a["effective_batch_size"] == b["effective_batch_size"] == 16


def test_accumulation_check_can_fail(tmp_path, fixed_length_dataset):
    """The same micro-batch without accumulation is a different run, and the comparison sees it."""
    _, big_grads = _run(tmp_path / "big", fixed_length_dataset, batch_size=16, accumulation=1)
    _, small_grads = _run(tmp_path / "small", fixed_length_dataset, batch_size=4, accumulation=1)
    assert _max_relative_difference(big_grads[0], small_grads[0]) > 1e-2


def test_partial_window_is_the_mean_of_its_micro_batches(tmp_path, fixed_length_dataset):
    """48 samples at batch 16 are 3 micro-batches; with accumulation 4 the epoch's only window is
    partial. Its gradient must be the mean over the 3 micro-batches, i.e. that of one batch of 48
    (before the fix it was 3/4 of it: Accelerate divides every micro-batch by 4)."""
    big_log, big_grads = _run(tmp_path / "big", fixed_length_dataset, batch_size=48, accumulation=1, steps=1)
    part_log, part_grads = _run(tmp_path / "part", fixed_length_dataset, batch_size=16, accumulation=4, steps=1)
    assert len(big_grads) == len(part_grads) == 1
    assert _max_relative_difference(big_grads[0], part_grads[0]) < 1e-5
    big, part = (next(r for r in log if "grad_norm" in r) for log in (big_log, part_log))
    assert part["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)


def test_window_length_does_not_change_a_full_epoch_step(tmp_path, fixed_length_dataset):
    """The issue's example: the same micro-batches as one full window (accumulation 3) or as a
    partial one (accumulation 5) give the same step: same loss, same grad_norm."""
    full_log, full_grads = _run(tmp_path / "full", fixed_length_dataset, batch_size=16, accumulation=3, steps=1)
    part_log, part_grads = _run(tmp_path / "part", fixed_length_dataset, batch_size=16, accumulation=5, steps=1)
    assert _max_relative_difference(full_grads[0], part_grads[0]) < 1e-6
    full, part = (next(r for r in log if "grad_norm" in r) for log in (full_log, part_log))
    assert part["total_loss"] == pytest.approx(full["total_loss"], rel=1e-6)
    assert part["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-6)
