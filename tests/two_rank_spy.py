"""Run by `accelerate launch --multi_gpu --num_processes 2` from test_telemetry.py.

Each rank trains the tiny preset and records what it contributed to every cross-rank gather in
``OUT/rank{r}.json``, so the test can recompute the main process's record from both ranks.
(A real launcher, not debug_launcher: forking a pytest process that already ran torch kernels
deadlocks oneDNN convolutions in the children.)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config

from mmtrain import telemetry
from mmtrain.trainer import Trainer


def main(out_dir: str) -> None:
    local = []
    original = telemetry.gather_named

    def spy(accelerator, parts):
        local.append(original(None, parts)[0])  # this rank's own named values, before the gather
        return original(accelerator, parts)

    telemetry.gather_named = spy
    cfg = tiny_config(out_dir, **{"wandb.log_frequency": 1, "train.max_steps": 4, "wandb.media_samples": 0})
    trainer = Trainer(cfg)
    trainer.fit()
    Path(out_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(local))


if __name__ == "__main__":
    main(sys.argv[1])
