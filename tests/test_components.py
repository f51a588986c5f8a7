"""The seams of the training loop, each tested without a training run where it can be: the save
policy, packing by name, the one loss reduction, registered state, and light inference imports."""

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, tiny_config

from mmtrain import model as model_module
from mmtrain.checkpoint import CheckpointManager, TrainState
from mmtrain.config import CheckpointConfig, ModelConfig
from mmtrain.distributed import gather_named


def _manager(tmp_path, **cfg) -> CheckpointManager:
    acc = SimpleNamespace(num_processes=1, is_main_process=True, process_index=0)
    return CheckpointManager(acc, tmp_path, CheckpointConfig(**cfg), objects=None, states={}, rank_states={})


# ------------------------------------------------------------------------------- the save policy

def test_should_save_every_n_steps_at_epoch_ends_and_on_stop(tmp_path):
    m = _manager(tmp_path, every_steps=3)
    assert [s for s in range(1, 10) if m.should_save(s)] == [3, 6, 9]
    assert m.should_save(4, epoch_end=True) and m.should_save(5, stop=True) and m.should_save(7, timer_due=True)
    assert not _manager(tmp_path).should_save(3)  # every_steps 0: only epoch ends, stops and the timer


def test_should_save_never_twice_for_one_step(tmp_path):
    m = _manager(tmp_path, every_steps=2)
    m.last_saved_step = 4
    assert not m.should_save(4) and not m.should_save(4, epoch_end=True, stop=True, timer_due=True)
    assert m.should_save(6)


def test_timer_is_due_after_every_minutes(tmp_path):
    m = _manager(tmp_path, every_minutes=0.5)
    assert not m.timer_due()
    m.last_save_time -= 31.0
    assert m.timer_due()
    assert not _manager(tmp_path).timer_due()  # every_minutes 0: off


# ----------------------------------------------------------------------------- packing by name

def test_gather_named_unpacks_every_column_by_its_name():
    parts = {"a": {"x": torch.tensor(1.5, dtype=torch.float64), "y": 2.0},
             "b": (("p", "q", "r"), torch.tensor([3.0, 4.0, 5.0])), "c": {}}
    assert gather_named(None, parts) == [{"a": {"x": 1.5, "y": 2.0}, "b": {"p": 3.0, "q": 4.0, "r": 5.0}, "c": {}}]


def test_gather_named_refuses_a_vector_whose_names_do_not_fit():
    with pytest.raises(ValueError, match="part 'b': 2 values for 3 column names"):
        gather_named(None, {"b": (("p", "q", "r"), torch.zeros(2))})


def test_counts_stay_exact_through_the_packing():
    big = 2**40 + 1  # not representable in float32
    assert gather_named(None, {"c": {"samples": big}})[0]["c"]["samples"] == big


# -------------------------------------------------------------------------- the one loss reduction

def test_reduce_terms_is_the_weighted_sum_of_ratio_and_mean_components():
    cfg = ModelConfig(image_loss_weight=0.3, caption_loss_weight=1.7, alignment_loss_weight=2.5, vocab_size=5)
    sums = {"image_se": torch.tensor(2.0), "caption_ce_sum": torch.tensor(30.0), "caption_tokens": torch.tensor(12.0),
            "alignment": torch.tensor(8.0)}
    got = {k: v.item() for k, v in model_module.reduce_terms(cfg, sums, 4).items()}
    expected = {"loss_image": 0.5, "loss_caption": 2.5, "loss_alignment": 2.0}
    expected["total_loss"] = 0.3 * 0.5 + 1.7 * 2.5 + 2.5 * 2.0
    assert got == pytest.approx(expected)


@dataclasses.dataclass
class _ConfigWithAFakeTerm(ModelConfig):
    fake_loss_weight: float = 10.0


def test_a_new_loss_term_reaches_training_evaluation_and_the_record(tmp_path, monkeypatch):
    """A fake component, added the way a real one would be (a per-sample term, a weight field, a
    line in LOSS_COMPONENTS), shows up in the training window, in validation and in total_loss,
    with no change to the trainer, telemetry, evaluator or loggers."""
    terms = model_module.per_sample_terms

    def with_fake(*args, **kwargs):
        out = terms(*args, **kwargs)
        return {**out, "fake": torch.full_like(out["image_se"], 0.25)}  # a constant 0.25 per sample

    monkeypatch.setattr(model_module, "per_sample_terms", with_fake)
    monkeypatch.setitem(model_module.LOSS_COMPONENTS, "loss_fake", ("fake", None, "fake_loss_weight"))
    cfg = tiny_config(tmp_path, **{"train.max_steps": 2, "wandb.log_frequency": 1, "wandb.mode": "disabled"})
    cfg = dataclasses.replace(cfg, model=_ConfigWithAFakeTerm(**dataclasses.asdict(cfg.model)))
    from mmtrain.trainer import Trainer

    Trainer(cfg).fit()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss_fake" in r]
    assert len(train) == 2 and all(r["loss_fake"] == pytest.approx(0.25) for r in train)
    val = [r for r in records if "val/loss_fake" in r]
    assert len(val) == 1 and val[0]["val/loss_fake"] == pytest.approx(0.25)
    for r, p in [*((r, "") for r in train), (val[0], "val/")]:
        weighted = (cfg.model.image_loss_weight * r[f"{p}loss_image"] + cfg.model.caption_loss_weight *
                    r[f"{p}loss_caption"] + cfg.model.alignment_loss_weight * r[f"{p}loss_alignment"] + 10.0 * 0.25)
        assert r[f"{p}total_loss"] == pytest.approx(weighted, rel=1e-6)


# --------------------------------------------------------------------------- registered state

class _Counter:
    """A component the manager has never heard of: registering it is all it takes."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_every_registered_state_is_saved_and_restored_by_name(tmp_path):
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 2, "wandb.mode": "disabled"}))
    shared, own = _Counter(), _Counter()
    trainer.checkpointer.states["counter"] = shared
    trainer.checkpointer.rank_states["own_counter"] = own
    shared.value, own.value = 7, 11
    trainer.state.optimizer_step = 2
    path = trainer.save_checkpoint()
    meta = json.loads((path / "train_state.json").read_text())
    assert meta["counter"] == {"value": 7} and meta["train_state"]["optimizer_step"] == 2
    shared.value = own.value = 0
    trainer.state = TrainState()
    trainer.checkpointer.states["train_state"] = trainer.state
    trainer.checkpointer.restore(path)
    assert (shared.value, own.value, trainer.state.optimizer_step) == (7, 11, 2)


# ------------------------------------------------------------------------------ light inference

def test_predict_and_retrieve_import_neither_accelerate_nor_wandb():
    code = ("import sys, mmtrain.inference, mmtrain.export; "
            "print(sorted(m for m in ('accelerate', 'wandb', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
