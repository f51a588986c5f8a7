"""Shared test set-up: every test runs offline, with caches in temporary folders."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _isolate_environment() -> None:
    """No test reads or writes the user's caches, contacts the Hub, or needs a W&B key.

    Set at import time, before any test module imports huggingface_hub/datasets, which read
    their offline flags once, at import.
    """
    root = Path(tempfile.mkdtemp(prefix="mmtrain-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ["MMTRAIN_CACHE"] = str(root / "mmtrain-cache")
    os.environ["HF_HOME"] = str(root / "hf-home")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_DIR"] = str(root / "wandb")
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.pop("WANDB_MODE", None)
    os.environ["NETRC"] = str(root / "no-netrc")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


_isolate_environment()


@pytest.fixture
def tiny_yaml() -> Path:
    return TINY


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each Trainer in a test process needs fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def tiny_config(output_dir: Path, **overrides):
    """configs/tiny.yaml with the output folder and any ``section.field`` overrides applied."""
    from mmtrain.config import load_config

    return load_config(TINY, {"train.output_dir": str(output_dir), **overrides})


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
