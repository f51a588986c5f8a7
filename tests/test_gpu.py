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
    reading = dict(zip(HW_KEYS, HardwareMonitor(torch.device("cuda", 0)).read(), strict=True))
    assert reading["gpu_memory_used"] > 0 and 0 < reading["gpu_memory_percent"] <= 100
    assert reading["torch_allocated_mb"] >= 4.0 - 1e-6
