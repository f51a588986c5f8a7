"""Synthetic engravings: deterministic, captions that follow the drawing, cached as a datasets object."""

import numpy as np
import pytest

from mmtrain import synthetic
from mmtrain.synthetic import COUNTS, FILLS, RELATIONS, SHAPES, SIZES, draw_engraving, generate_split

VOCAB = {"an", "engraving", "of", "within", "border", "to", "the", "left"} | set(COUNTS) | set(FILLS) | set(SIZES) \
    | {w for r in RELATIONS for w in r.split()} | set(SHAPES) | {s + "s" for s in SHAPES} | {"crosses"}


def test_same_seed_same_images_other_seed_other_images():
    a_img, a_cap = generate_split(6, 32, seed=1, split_id=0)
    b_img, b_cap = generate_split(6, 32, seed=1, split_id=0)
    c_img, c_cap = generate_split(6, 32, seed=2, split_id=0)
    def same(xs, ys):
        return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(xs, ys, strict=True))

    assert a_cap == b_cap and same(a_img, b_img)
    assert a_cap != c_cap and not same(a_img, c_img)
    # sample i depends only on (seed, split, i): a shorter split is a prefix
    _, d_cap = generate_split(3, 32, seed=1, split_id=0)
    assert d_cap == a_cap[:3]


def test_captions_follow_the_grammar():
    _, captions = generate_split(200, 32, seed=0, split_id=0)
    for c in captions:
        assert c.startswith("an engraving of ")
        assert set(c.split()) <= VOCAB, c
    assert any(" above " in c for c in captions) and any("to the left of" in c for c in captions)
    assert any("within a border" in c for c in captions)


def _ink(caption_filter, n=400):
    images, captions = generate_split(n, 64, seed=5, split_id=0)
    return [float((np.asarray(img) < 128).mean())
            for img, c in zip(images, captions, strict=True) if caption_filter(c)]


def test_caption_agrees_with_the_pixels():
    """Black fills put far more ink on the page than outlines; a border adds ink at the margin."""
    def one_large(fill):
        return lambda c: c.startswith(f"an engraving of a large {fill} ") and " above " not in c and "left" not in c

    black, outlined = _ink(one_large("black"), 1200), _ink(one_large("outlined"), 1200)
    assert len(black) >= 5 and len(outlined) >= 5
    assert min(black) > max(outlined)
    images, captions = generate_split(200, 64, seed=6, split_id=0)
    edge = [float((np.asarray(img)[2:6, 8:-8] < 160).mean()) for img in images]
    bordered = [e for e, c in zip(edge, captions, strict=False) if "border" in c]
    plain = [e for e, c in zip(edge, captions, strict=False) if "border" not in c]
    assert min(bordered) > max(plain)


def test_draw_returns_requested_size_and_mode():
    image, caption = draw_engraving(np.random.default_rng(0), 48)
    assert image.size == (48, 48) and image.mode == "L" and caption


def test_dataset_is_cached_and_keyed_on_settings(tmp_path, monkeypatch):
    ds = synthetic.synthetic_dataset(12, 4, 32, seed=0, cache_dir=tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 12, "validation": 4}
    assert ds["train"].features["image"].__class__.__name__ == "Image"
    first = ds["train"]["caption"]

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "generate_split", boom)
    again = synthetic.synthetic_dataset(12, 4, 32, seed=0, cache_dir=tmp_path)
    assert list(again["train"]["caption"]) == list(first)
    with pytest.raises(AssertionError, match="regenerated"):
        synthetic.synthetic_dataset(12, 4, 32, seed=1, cache_dir=tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
