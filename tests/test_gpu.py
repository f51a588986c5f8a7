"""What only a GPU shows: fp16 with loss scaling, NVML readings of the rank's own device."""

import math

import pytest
import torch
from conftest import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fp16_trains_with_loss_scaling(tmp_path):
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path / "fp16", **{"train.mixed_precision": "fp16", "train.max_steps": 4,
                                                         "wandb.mode": "disabled"}))
    assert trainer.accelerator.mixed_precision == "fp16"
    assert trainer.accelerator.scaler is not None
    result = trainer.fit()
    assert result["optimizer_steps"] == 4 and math.isfinite(result["final_train_loss"])


def test_hardware_reads_own_gpu():
    from mmtrain.hardware import HW_KEYS, HardwareMonitor

    torch.ones(1024, 1024, device="cuda")
    reading = HardwareMonitor(torch.device("cuda", 0)).read()
    assert set(reading) == set(HW_KEYS)
    assert reading["gpu_memory_used"] > 0 and 0 < reading["gpu_memory_percent"] <= 100
    assert reading["torch_allocated_mb"] >= 4.0 - 1e-6


def test_non_log_steps_do_not_synchronise_the_gpu(tmp_path):
    """CUDA's own sync detector, set to raise, around every training step that is not a log step.

    fp32 (no GradScaler: its overflow check reads a value back every step by design)."""
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 9, "wandb.log_frequency": 4,
                                               "wandb.image_log_frequency": 4, "wandb.mode": "offline"}))

    def in_mode(fn, mode, after):
        """Run ``fn`` with CUDA's sync debug mode at ``mode``, then set it to ``after``."""
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(after)
        return wrapped

    def allowed(fn):  # a log step may synchronise; the loop around it may not
        return in_mode(fn, "default", "error")

    def strict(fn):
        return in_mode(fn, "error", "default")

    # The same public read-out points tests/test_sync.py allows.
    for owner, name in ((trainer, "read_nonfinite_or_raise"), (trainer, "validate_and_log_epoch"),
                        (trainer, "save_checkpoint"), (trainer.telemetry, "gather_log_record"),
                        (trainer.media, "reconstructions")):
        setattr(owner, name, allowed(getattr(owner, name)))
    trainer.train_epoch = strict(trainer.train_epoch)
    result = trainer.fit()
    assert result["optimizer_steps"] == 9


def test_gather_named_without_an_accelerator_keeps_cuda_values_on_one_device():
    from mmtrain.distributed import gather_named

    cuda = torch.device("cuda", 0)
    got = gather_named(None, {"loss": {"total_loss": torch.tensor(2.0, device=cuda), "n": 3.0},
                              "sums": (("a", "b"), torch.tensor([1.0, 4.0], device=cuda))})
    assert got == [{"loss": {"total_loss": 2.0, "n": 3.0}, "sums": {"a": 1.0, "b": 4.0}}]
