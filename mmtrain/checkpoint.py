"""Checkpoints and the exported model, written so that a crash never leaves a half-written one.

A checkpoint is ``checkpoints/step_XXXXXXXX/``: Accelerate's ``save_state`` (model, optimizer,
registered scheduler, every rank's RNG state) plus ``tokenizer/`` and ``train_state.json``.
It is written into a hidden temporary sibling, flushed to disk, and renamed into place by the
main rank: a folder named ``step_*`` is therefore always complete, and ``train_state.json``
(written last) is its validity marker.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "train_state.json"


def _fsync_tree(root: Path) -> None:
    for path in [*sorted(root.rglob("*")), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put ``tmp`` at ``final``; an existing ``final`` is removed only after the swap."""
    _fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Owns the checkpoint folder: where, when complete, how many to keep."""

    def __init__(self, accelerator: Accelerator, root: Path, keep_last: int = 3) -> None:
        self.accelerator = accelerator
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Valid checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).is_file())

    def save(self, step: int, train_state: dict[str, Any], tokenizer: Any) -> Path:
        """Collective: every rank must call it (each writes its own RNG state)."""
        acc = self.accelerator
        final = self.path_for(step)
        tmp = self.root / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2))
            _replace_dir(tmp, final)
            for stale in self.complete()[:-self.keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def model_card(run_config: dict[str, Any], results: dict[str, Any]) -> str:
    """The export's README.md: what was trained on what, how well, and how to load it."""
    def table(rows: dict[str, Any]) -> str:
        lines = ["| | |", "|---|---|"]
        for key, value in rows.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            lines.append(f"| `{key}` | {shown} |")
        return "\n".join(lines)

    data = {k: run_config[k] for k in ("train_samples", "val_samples", "vocab_size") if k in run_config}
    data["data"] = ", ".join(f"{k}={v}" for k, v in run_config.get("data", {}).items()
                             if k in ("source", "path", "image_column", "caption_column") and v is not None)
    training = {k: run_config[k] for k in ("total_parameters", "world_size", "mixed_precision",
                                           "effective_batch_size", "total_optimizer_steps", "epochs")
                if k in run_config}
    config_json = json.dumps({k: run_config[k] for k in ("model", "data", "optim", "train") if k in run_config},
                             indent=2)
    return f"""---
library_name: mmtrain
tags:
- mmtrain
- image-to-text
- image-reconstruction
---

# mmtrain engravings model

An image encoder -> latent -> image decoder (reconstruction) and a transformer caption decoder,
with the caption embedding aligned to the image latent (CLIP-style InfoNCE). Trained with mmtrain.

## Load it

```python
from transformers import AutoTokenizer
from mmtrain.model import MultimodalModel

model = MultimodalModel.from_pretrained("path/to/this/folder").eval()
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

or from the command line:

```bash
mmtrain predict path/to/this/folder image.png --out predictions/
mmtrain retrieve path/to/this/folder --images images/ --query "an engraving of two circles"
```

## Data

{table(data)}

## Training

{table(training)}

## Results

{table(results)}

## Training config

```json
{config_json}
```
"""


def export_model(model: Any, tokenizer: Any, out_dir: Path, card: str | None = None) -> Path:
    """Write the model as safetensors + config.json + model card and the tokenizer, atomically.

    The result loads with ``MultimodalModel.from_pretrained(out_dir)`` and the tokenizer with
    ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if card is not None:
        (tmp / "README.md").write_text(card)
    _replace_dir(tmp, out_dir)
    return out_dir
