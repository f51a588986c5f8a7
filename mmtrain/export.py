"""The exported model folder and its model card.

``export_model`` writes what a user of the trained model needs, and nothing of the run itself::

    model.safetensors   the weights (PyTorchModelHubMixin.save_pretrained)
    config.json         the ModelConfig, so ``MultimodalModel.from_pretrained`` rebuilds the model
    tokenizer.json ...  the tokenizer, for ``AutoTokenizer.from_pretrained``
    README.md           the model card (``model_card``)

The folder is written as a hidden ``.NAME.tmp`` sibling and swapped into place as a whole with
``mmtrain.fsio.replace_dir``: a crash at any moment leaves the previous export or the new one,
never a mix.

``model_card`` builds the README.md with ``huggingface_hub.ModelCard``: its YAML front matter
(``library_name``, ``tags``, ``pipeline_tag``, ``datasets``, ``model-index``) is the Hub's model card
metadata, so the folder can be uploaded as it is; the body says how to load the model and what it
was trained on, how, and how well.

Light on purpose: ``mmtrain predict`` and ``retrieve`` load exports, so nothing here imports
Accelerate or W&B.
"""

import json
import math
import numbers
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mmtrain.fsio import replace_dir

LIBRARY_NAME = "mmtrain"
PIPELINE_TAG = "image-to-text"
# The first two are MultimodalModel's own (PyTorchModelHubMixin class arguments); the mixin adds the
# last two to every card it writes, and the Hub counts mixin-based models by them.
TAGS = ["mmtrain", "image-to-text", "image-reconstruction", "image-text-alignment", "model_hub_mixin",
        "pytorch_model_hub_mixin"]
DEFAULT_MODEL_NAME = "mmtrain engravings model"
SYNTHETIC_DATASET = "synthetic engravings"
# The summary's losses that go into model-index besides every ``val/*`` metric.
RESULT_LOSSES = ("final_validation_loss", "best_validation_loss")


def _number(value: Any) -> int | float | None:
    """A plain, finite int or float for the YAML front matter, or None (left out)."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)  # numpy / torch scalars would not dump as plain YAML numbers
    return value if math.isfinite(value) else None


def _dataset(data: dict[str, Any]) -> tuple[str, str]:
    """(name, type) of the training data for model-index: the synthetic engravings, the Hub
    dataset id, or the local folder's name with its kind (imagefolder / disk) as the type."""
    source, path = data.get("source", "synthetic"), data.get("path")
    if source == "synthetic" or not path:
        return SYNTHETIC_DATASET, "synthetic-engravings"
    if source == "hub":
        return path, path
    return Path(path).name or str(path), source


def eval_results(run_config: dict[str, Any], results: dict[str, Any]) -> list[EvalResult]:
    """model-index entries: the final and best validation losses and every ``val/*`` metric in
    ``results`` whose value is a finite number (None, NaN and inf are left out)."""
    data = run_config.get("data") or {}
    name, kind = _dataset(data)
    keys = [k for k in RESULT_LOSSES if k in results] + [k for k in results if k.startswith("val/")]
    out = []
    for key in keys:
        value = _number(results[key])
        if value is None:
            continue
        out.append(EvalResult(task_type=PIPELINE_TAG, task_name="Image to text", dataset_type=kind,
                              dataset_name=name, dataset_split=data.get("val_split"),
                              metric_type=key, metric_name=key, metric_value=value))
    return out


def card_data(run_config: dict[str, Any], results: dict[str, Any]) -> ModelCardData:
    """The card's metadata (its YAML front matter)."""
    data = run_config.get("data") or {}
    model_name = (run_config.get("wandb") or {}).get("name") or DEFAULT_MODEL_NAME
    return ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[data["path"]] if data.get("source") == "hub" and data.get("path") else None,
        eval_results=eval_results(run_config, results) or None,
    )


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    for key, value in rows.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        lines.append(f"| `{key}` | {shown} |")
    return "\n".join(lines)


def card_body(model_name: str, run_config: dict[str, Any], results: dict[str, Any]) -> str:
    """The card's markdown: what the model is, how to load it, its data, training and results."""
    data = {k: run_config[k] for k in ("train_samples", "val_samples", "vocab_size") if k in run_config}
    data["data"] = ", ".join(f"{k}={v}" for k, v in (run_config.get("data") or {}).items()
                             if k in ("source", "path", "image_column", "caption_column") and v is not None)
    training = {k: run_config[k] for k in ("total_parameters", "world_size", "mixed_precision",
                                           "effective_batch_size", "total_optimizer_steps", "epochs")
                if k in run_config}
    config_json = json.dumps({k: run_config[k] for k in ("model", "data", "optim", "train") if k in run_config},
                             indent=2, default=str)
    return f"""
# {model_name}

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

{_table(data)}

## Training

{_table(training)}

## Results

{_table(results)}

## Training config

```json
{config_json}
```
"""


def model_card(run_config: dict[str, Any], results: dict[str, Any]) -> ModelCard:
    """The export's README.md: Hub metadata in the front matter (see ``card_data``), then what was
    trained on what, how well, and how to load it.

    ``run_config`` is the trainer's resolved config plus derived values (``train_samples``,
    ``total_parameters``, ...); ``results`` the run summary plus the last ``val/*`` metrics.
    """
    meta = card_data(run_config, results)
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n{card_body(meta.model_name, run_config, results)}")


def export_model(model: Any, tokenizer: Any, out_dir: Path, card: ModelCard | None = None) -> Path:
    """Write the model (safetensors + config.json), the tokenizer and the model card into
    ``out_dir``, atomically: an existing ``out_dir`` is replaced as a whole, and a crash before the
    swap leaves it untouched (and at worst a ``.NAME.tmp`` sibling, removed by the next export).

    ``save_pretrained`` writes the mixin's generic card; ``card``, when given, replaces it. The
    result loads with ``MultimodalModel.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if card is not None:
        card.save(tmp / "README.md")
    replace_dir(tmp, out_dir)
    return out_dir
