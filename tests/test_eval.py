"""Validation values are a property of the weights and the val split, not of how evaluation is batched.

(Across process counts: tests/test_distributed.py runs 1 vs 2 gloo processes.)
"""

import pytest
from conftest import reset_accelerate, tiny_config

from mmtrain.trainer import Trainer


def _evaluate(out, eval_batch_size: int) -> dict[str, float]:
    cfg = tiny_config(out, **{"data.synthetic_val_size": 33, "train.eval_batch_size": eval_batch_size,
                              "wandb.mode": "disabled", "wandb.media_samples": 0})
    trainer = Trainer(cfg)
    try:
        return trainer.evaluator.run(trainer.model, trainer.val_loader)
    finally:
        trainer.accelerator.end_training()
        reset_accelerate()


def test_val_metrics_do_not_depend_on_the_eval_batch_size(tmp_path):
    base = _evaluate(tmp_path / "a", 8)
    for size in (5, 33, 64):
        other = _evaluate(tmp_path / f"b{size}", size)
        assert set(other) == set(base)
        for key, value in base.items():
            assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (size, key)


def test_val_alignment_groups_are_train_batch_sized(tmp_path):
    """The alignment term contrasts each val sample with train.batch_size - 1 others, as in
    training: a different train.batch_size gives a different value (with the same weights)."""
    a = _evaluate(tmp_path / "a", 8)["val/loss_alignment"]
    cfg_out = tmp_path / "c"
    cfg = tiny_config(cfg_out, **{"data.synthetic_val_size": 33, "train.eval_batch_size": 8, "train.batch_size": 8,
                                  "wandb.mode": "disabled", "wandb.media_samples": 0})
    trainer = Trainer(cfg)
    try:
        b = trainer.evaluator.run(trainer.model, trainer.val_loader)["val/loss_alignment"]
    finally:
        trainer.accelerator.end_training()
        reset_accelerate()
    assert a != pytest.approx(b, rel=1e-4)
