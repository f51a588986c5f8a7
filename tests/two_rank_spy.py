"""Run by `accelerate launch --multi_gpu --num_processes 2` from test_telemetry.py.

Each rank trains the tiny preset and records what it contributed to every cross-rank gather in
``OUT/rank{r}.json``, so the test can recompute the main process's record from both ranks.
(A real launcher, not debug_launcher: forking a pytest process that already ran torch kernels
deadlocks oneDNN convolutions in the children.)
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config

from mmtrain import trainer as trainer_module
from mmtrain.trainer import Trainer


def main(out_dir: str) -> None:
    local = []
    original = trainer_module.gather_rows

    def spy(accelerator, parts):
        local.append({k: torch.as_tensor(v, dtype=torch.float64).flatten().tolist() for k, v in parts.items()})
        return original(accelerator, parts)

    trainer_module.gather_rows = spy
    cfg = tiny_config(out_dir, **{"wandb.log_frequency": 1, "train.max_steps": 4, "wandb.media_samples": 0})
    trainer = Trainer(cfg)
    trainer.fit()
    Path(out_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(local))


if __name__ == "__main__":
    main(sys.argv[1])
