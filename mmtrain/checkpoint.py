"""Checkpoints and the exported model, written so that a crash never leaves a half-written one.

A checkpoint is ``checkpoints/step_XXXXXXXX/``::

    model.safetensors   the weights
    optimizer.pt        AdamW state (identical on every rank after DDP's all-reduce)
    scheduler.pt        the LR schedule's position
    scaler.pt           fp16 GradScaler state, when there is one
    rank_NNNNN.pt       per rank: RNG states and the trainer's partial log/epoch windows
    tokenizer/          the tokenizer the run trains with
    config.yaml         the resolved config
    train_state.json    step, epoch, position in the epoch, counters, W&B run id (written last)

Every ``.pt`` file holds only tensors and plain Python values and is read back with
``torch.load(weights_only=True)``: a checkpoint cannot run code when loaded.

It is written into a hidden temporary sibling, fsynced, and renamed into place by the main rank
(transformers' ``tmp-checkpoint-*``): a folder named ``step_*`` is therefore always complete, and
only one with ``train_state.json`` counts (torchtitan's rule), so a SIGKILL at any moment of a
save leaves at worst a ``.tmp-*`` folder that nothing reads and the next save removes.
"""

import json
import pickle
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from mmtrain.config import Config
from mmtrain.errors import CheckpointError
from mmtrain.fsio import TMP_PREFIX, replace_dir

STATE_FILE = "train_state.json"
FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``, with a refusal that names the file instead of a traceback."""
    try:
        with warnings.catch_warnings():  # torch's note about foreign pickle protocols: we say it better below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another one") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} cannot be loaded safely: it holds pickled objects other than tensors and "
                              "plain values, which mmtrain never writes, and loading it could run code. Resume from "
                              "a checkpoint you trust") from None
    except (RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be loaded safely ({reason}); it was not written by mmtrain or is "
                              "damaged: resume from another checkpoint") from None


@dataclass
class TrainingObjects:
    """What a checkpoint saves and restores, besides the per-rank and JSON state."""

    model: torch.nn.Module  # unwrapped
    optimizer: Any
    scheduler: Any
    scaler: Any
    tokenizer: Any
    config: Config


def read_train_state(path: Path) -> dict[str, Any]:
    """The JSON state of a complete checkpoint, or a CheckpointError naming what is wrong."""
    state_file = Path(path) / STATE_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"train.resume={str(path)!r} is not a folder; give a checkpoint folder "
                              "(output_dir/checkpoints/step_*), auto or none")
    if not state_file.is_file():
        raise CheckpointError(f"train.resume={str(path)!r} is not a complete mmtrain checkpoint (no {STATE_FILE}); "
                              "it may be from a save that was interrupted: resume from another one, or use auto")
    try:
        meta = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e}); resume from another checkpoint") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: checkpoint format {meta.get('format')!r}, this mmtrain reads "
                              f"format {FORMAT_VERSION}; resume it with the mmtrain version that wrote it")
    return meta


class Checkpointer:
    """Owns the checkpoint folder: where, when complete, how many to keep, what to resume."""

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

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from for ``train.resume``. Collective: the main rank decides
        (its view of the file system wins) and broadcasts the decision, or the error, to all."""
        decision: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                if resume == "none":
                    decision = [None]
                elif resume == "auto":
                    found = self.complete()
                    decision = [str(found[-1]) if found else None]
                else:
                    path = Path(resume).expanduser()
                    read_train_state(path)
                    decision = [str(path)]
            except CheckpointError as e:
                decision = [e]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision)
        if isinstance(decision[0], CheckpointError):
            raise decision[0]
        return Path(decision[0]) if decision[0] is not None else None

    def save(self, step: int, objects: TrainingObjects, train_state: dict[str, Any],
             rank_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it (each writes its own RNG state and windows)."""
        acc = self.accelerator
        final = self.path_for(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self._write_rank(tmp, rank_state)
        if acc.is_main_process:
            self._write_shared(tmp, objects)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._commit(tmp, final, train_state)
        acc.wait_for_everyone()
        return final

    def _write_rank(self, tmp: Path, rank_state: dict[str, Any]) -> None:
        torch.save({"rng": capture_rng(), **rank_state}, tmp / f"rank_{self.accelerator.process_index:05d}.pt")

    def _write_shared(self, tmp: Path, o: TrainingObjects) -> None:
        save_model(o.model, str(tmp / "model.safetensors"))  # de-duplicates the tied embedding
        torch.save(o.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(o.scheduler.state_dict(), tmp / "scheduler.pt")
        if o.scaler is not None:
            torch.save(o.scaler.state_dict(), tmp / "scaler.pt")
        o.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        o.config.dump(tmp / "config.yaml")

    def _commit(self, tmp: Path, final: Path, train_state: dict[str, Any]) -> None:
        """The validity marker last, then the atomic rename, then pruning."""
        meta = {"format": FORMAT_VERSION, "world_size": self.accelerator.num_processes, **train_state}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, final)
        for stale in self.complete()[:-self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        # Left by a save that was killed: a temporary folder, or the old copy of a replaced step.
        for partial in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(".step_*.old")]:
            shutil.rmtree(partial, ignore_errors=True)

    def load(self, path: Path, objects: TrainingObjects, device: torch.device) -> tuple[dict, dict]:
        """Restore model, optimizer, scheduler and scaler in place; return (train state, this rank's
        state). Every rank reads the shared files itself: no broadcast of large tensors."""
        meta = read_train_state(path)
        device = torch.device("cpu") if device.type == "cpu" else device  # Accelerate says cpu:0; loaders refuse it
        world = self.accelerator.num_processes
        if meta["world_size"] != world:
            raise CheckpointError(
                f"{path} was written by {meta['world_size']} process(es) and this run has {world}: the data "
                f"order, the per-rank RNG states and the schedule depend on it. Resume with "
                f"{meta['world_size']} process(es), or start a new run (--train.resume none) from the exported weights")
        try:
            missing, unexpected = load_model(objects.model, str(path / "model.safetensors"), strict=False,
                                             device=str(device))
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'} cannot be loaded ({e}); resume from another "
                                  "checkpoint") from None
        if missing or unexpected:
            raise CheckpointError(f"{path / 'model.safetensors'} does not fit this model (missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        objects.optimizer.load_state_dict(safe_load(path / "optimizer.pt", device))
        objects.scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
        if objects.scaler is not None and (path / "scaler.pt").is_file():
            objects.scaler.load_state_dict(safe_load(path / "scaler.pt"))
        rank = safe_load(path / f"rank_{self.accelerator.process_index:05d}.pt")
        return meta, rank


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
    replace_dir(tmp, out_dir)
    return out_dir
