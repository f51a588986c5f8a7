"""mmtrain.export: the model card's Hub metadata, and the exported folder (loads; written atomically)."""

import math

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from transformers import AutoTokenizer

import mmtrain.export
from mmtrain.config import ModelConfig
from mmtrain.export import export_model, model_card
from mmtrain.model import MultimodalModel
from mmtrain.tokenizer import build_tokenizer

CAPTIONS = ["an engraving of two circles", "an engraving of a star", "an engraving of a square and a star"]


def _run_config(source="synthetic", path=None, name=None):
    return {
        "model": {"latent_dim": 32}, "optim": {"lr": 3e-3}, "train": {"epochs": 2},
        "data": {"source": source, "path": path, "image_column": "image", "caption_column": "caption",
                 "val_split": None},
        "wandb": {"name": name},
        "train_samples": 96, "val_samples": 32, "vocab_size": 17, "total_parameters": 12345, "epochs": 2,
    }


RESULTS = {"final_validation_loss": 3.25, "best_validation_loss": 3.125, "best_validation_epoch": 2,
           "final_train_loss": 3.5, "total_parameters": 12345,
           "val/total_loss": 3.25, "val/loss_image": 0.0625, "val/i2t_R@1": 0.25, "val/t2i_R@5": 0.75}


def _metrics(meta):
    [entry] = meta["model-index"]
    return {m["type"]: m["value"] for result in entry["results"] for m in result["metrics"]}


def test_card_metadata_is_the_hubs_and_round_trips(tmp_path):
    card = model_card(_run_config(), RESULTS)
    assert isinstance(card, ModelCard) and isinstance(card.data, ModelCardData)
    assert card.data.library_name == "mmtrain" and card.data.pipeline_tag == "image-to-text"
    assert {"mmtrain", "image-to-text", "image-reconstruction"} <= set(card.data.tags)
    assert card.data.datasets is None  # synthetic data has no Hub dataset to link
    assert card.data.model_name == "mmtrain engravings model"
    path = tmp_path / "README.md"
    card.save(path)
    assert ModelCard.load(path).data.to_dict() == card.data.to_dict()
    meta = metadata_load(path)
    assert meta["library_name"] == "mmtrain" and meta["pipeline_tag"] == "image-to-text"
    assert "mmtrain" in meta["tags"]
    assert meta["model-index"][0]["name"] == "mmtrain engravings model"
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "image-to-text"
    assert result["dataset"]["name"] == "synthetic engravings"
    # the validation losses and val/* metrics only; counts and training losses stay in the body
    assert _metrics(meta) == {"final_validation_loss": 3.25, "best_validation_loss": 3.125, "val/total_loss": 3.25,
                              "val/loss_image": 0.0625, "val/i2t_R@1": 0.25, "val/t2i_R@5": 0.75}


def test_card_body_keeps_loading_instructions_tables_and_config():
    text = str(model_card(_run_config(name="engravings-v2"), RESULTS))
    assert "# engravings-v2" in text
    assert "MultimodalModel.from_pretrained" in text and "AutoTokenizer.from_pretrained" in text
    assert "mmtrain predict" in text and "mmtrain retrieve" in text
    assert "| `train_samples` | 96 |" in text and "| `final_train_loss` | 3.5 |" in text
    assert "| `val/i2t_R@1` | 0.25 |" in text and '"latent_dim": 32' in text


def test_hub_dataset_is_linked_and_names_the_results(tmp_path):
    card = model_card(_run_config("hub", "someone/engravings"), RESULTS)
    assert card.data.datasets == ["someone/engravings"]
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert meta["datasets"] == ["someone/engravings"]
    dataset = meta["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"name": "someone/engravings", "type": "someone/engravings"}


def test_local_folder_names_the_results_by_the_folder(tmp_path):
    card = model_card(_run_config("imagefolder", str(tmp_path / "my_engravings")), RESULTS)
    assert card.data.datasets is None
    assert {(r.dataset_name, r.dataset_type) for r in card.data.eval_results} == {("my_engravings", "imagefolder")}


def test_none_and_nonfinite_results_are_left_out_of_model_index(tmp_path):
    results = {"final_validation_loss": None, "best_validation_loss": math.inf, "val/total_loss": math.nan,
               "val/loss_image": -math.inf, "val/i2t_R@1": np.float32(0.5), "val/t2i_R@1": True,
               "val/note": "n/a", "val/count": np.int64(7)}
    card = model_card(_run_config(), results)
    path = tmp_path / "README.md"
    card.save(path)
    values = _metrics(metadata_load(path))
    assert values == {"val/i2t_R@1": 0.5, "val/count": 7}
    assert type(values["val/i2t_R@1"]) is float and type(values["val/count"]) is int
    # everything is still shown in the body's Results table
    assert "| `val/total_loss` | nan |" in str(card) and "| `final_validation_loss` | None |" in str(card)


def test_no_usable_results_means_no_model_index(tmp_path):
    card = model_card(_run_config(), {"final_validation_loss": None, "best_validation_loss": math.inf})
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert "model-index" not in meta and meta["library_name"] == "mmtrain"


# ------------------------------------------------------------------------------------ the exported folder

@pytest.fixture
def tiny():
    tokenizer = build_tokenizer(CAPTIONS, 10)
    config = ModelConfig(image_size=32, image_channels=1, latent_dim=32, image_encoder_layers=2, base_channels=8,
                         max_channels=16, embedding_dim=32, transformer_layers=2, text_layers=1,
                         attention_heads=2, prefix_tokens=2, max_caption_length=10, dropout=0.0,
                         vocab_size=len(tokenizer))
    torch.manual_seed(0)
    return MultimodalModel(config).eval(), tokenizer


def test_export_loads_and_carries_our_card(tiny, tmp_path):
    model, tokenizer = tiny
    out = export_model(model, tokenizer, tmp_path / "model", model_card(_run_config(), RESULTS))
    assert out == tmp_path / "model"
    loaded = MultimodalModel.from_pretrained(str(out)).eval()
    assert loaded.config == model.config
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.image_encoder(x), model.image_encoder(x))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == tokenizer.get_vocab() and len(tok) == model.config.vocab_size
    # save_pretrained writes the mixin's generic card first; ours replaces it
    text = (out / "README.md").read_text()
    assert "# mmtrain engravings model" in text and "PytorchModelHubMixin" not in text
    meta = metadata_load(out / "README.md")
    assert meta["pipeline_tag"] == "image-to-text" and _metrics(meta)["val/i2t_R@1"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .model.tmp / .model.old left


def test_export_without_a_card_keeps_the_mixins(tiny, tmp_path):
    out = export_model(*tiny, tmp_path / "model")
    assert metadata_load(out / "README.md")["library_name"] == "mmtrain"


def test_export_replaces_an_existing_folder_as_a_whole(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    (tmp_path / ".model.tmp").mkdir()  # left by a crashed export
    (tmp_path / ".model.tmp" / "junk.bin").write_bytes(b"x")
    export_model(*tiny, out, model_card(_run_config(), RESULTS))
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_crash_before_the_swap_leaves_the_old_export(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    out = export_model(model, tokenizer, tmp_path / "model", model_card(_run_config(), RESULTS))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tmp, final):
        raise OSError("disk full")

    monkeypatch.setattr(mmtrain.export, "replace_dir", crash)
    torch.manual_seed(1)
    other = MultimodalModel(model.config)
    with pytest.raises(OSError, match="disk full"):
        export_model(other, tokenizer, out, model_card(_run_config(name="other"), {}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert torch.equal(MultimodalModel.from_pretrained(str(out)).image_encoder.to_latent.weight,
                       model.image_encoder.to_latent.weight)
