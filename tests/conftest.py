"""Shared test set-up: every test runs offline, with caches in temporary folders."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads or writes the user's caches, contacts the Hub, or needs a W&B key."""
    root = tmp_path_factory.mktemp("env")
    os.environ["MMTRAIN_CACHE"] = str(root / "mmtrain-cache")
    os.environ["HF_HOME"] = str(root / "hf-home")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_DIR"] = str(root / "wandb")
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["NETRC"] = str(root / "no-netrc")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture
def tiny_yaml() -> Path:
    return TINY
