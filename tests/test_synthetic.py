"""Synthetic engravings: deterministic, captions that follow a grammar and the drawing, cached as a DatasetDict."""

import math
import re

import numpy as np
import pytest
from datasets import DatasetDict

from mmtrain import synthetic
from mmtrain.synthetic import COUNTS, FILLS, RELATIONS, SHAPES, SIZES, draw_engraving, generate_split

# --- the caption grammar, built from the module's vocabulary ----------------------------------------------

_NOUN = "|".join(SHAPES) + "|" + "|".join(s + ("es" if s == "cross" else "s") for s in SHAPES)
_GROUP = rf"(?P<count{{i}}>{'|'.join(COUNTS)}) (?P<size{{i}}>{'|'.join(SIZES)}) (?P<fill{{i}}>{'|'.join(FILLS)}) " \
         rf"(?P<noun{{i}}>{_NOUN})"
GRAMMAR = re.compile(
    "an engraving of " + _GROUP.format(i=1)
    + rf"(?: (?P<relation>{'|'.join(RELATIONS)}) " + _GROUP.format(i=2) + ")?"
    + r"(?P<border> within a border)?"
)
VOCAB = {"an", "engraving", "of", "within", "border"} | set(COUNTS) | set(SIZES) | set(FILLS) | set(SHAPES) \
    | {w for r in RELATIONS for w in r.split()} | {s + "s" for s in SHAPES} | {"crosses"}


def _same_images(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(xs, ys, strict=True))


def test_same_seed_same_samples_other_seed_other_samples():
    a_img, a_cap = generate_split(6, 32, seed=1, split_id=0)
    b_img, b_cap = generate_split(6, 32, seed=1, split_id=0)
    c_img, c_cap = generate_split(6, 32, seed=2, split_id=0)
    v_img, v_cap = generate_split(6, 32, seed=1, split_id=1)
    assert a_cap == b_cap and _same_images(a_img, b_img)
    assert a_cap != c_cap and not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_img, c_img,
                                                                                                   strict=True))
    assert a_cap != v_cap and not _same_images(a_img, v_img)  # train and validation are different draws
    d_img, d_cap = generate_split(3, 32, seed=1, split_id=0)  # sample i depends only on (seed, split, i)
    assert d_cap == a_cap[:3] and _same_images(d_img, a_img[:3])


def test_images_are_grayscale_at_the_requested_size():
    images, _ = generate_split(4, 48, seed=0, split_id=0)
    assert all(img.size == (48, 48) and img.mode == "L" for img in images)
    pixels = np.asarray(images[0])
    assert pixels.min() < 100 < 200 < pixels.max()  # dark ink on light paper


def test_captions_follow_the_grammar():
    _, captions = generate_split(300, 16, seed=0, split_id=0)
    seen = {"relation": set(), "border": 0, "count": set(), "fill": set(), "size": set(), "shape": set()}
    for c in captions:
        assert c.startswith("an engraving of ")
        assert set(c.split()) <= VOCAB, c
        m = GRAMMAR.fullmatch(c)
        assert m, c
        for i in (1, 2):
            if m[f"count{i}"] is None:
                continue
            singular = m[f"count{i}"] == "a"
            noun = m[f"noun{i}"]
            assert (noun in SHAPES) == singular, c  # "a star", "two stars", "three crosses"
            seen["count"].add(m[f"count{i}"])
            seen["fill"].add(m[f"fill{i}"])
            seen["size"].add(m[f"size{i}"])
            seen["shape"].add(noun if singular else noun[:-2] if noun == "crosses" else noun[:-1])
        seen["relation"].add(m["relation"])
        seen["border"] += bool(m["border"])
    # the generator uses its whole vocabulary
    assert seen["relation"] == {None, *RELATIONS}
    assert seen["count"] == set(COUNTS) and seen["fill"] == set(FILLS) and seen["size"] == set(SIZES)
    assert seen["shape"] == set(SHAPES)
    assert 0 < seen["border"] < len(captions)


# --- captions agree with the pixels: scenes drawn with a scripted random generator -------------------------


class ScriptedRng:
    """Stands in for np.random.Generator in draw_engraving: the scene (groups, relation, border) is the one
    given; positions, sizes within their range, rotations, hatching and noise come from a real seeded generator,
    so two scenes with the same seed that differ in one word share everything else."""

    def __init__(self, seed, groups, relation=None, border=False):
        self._rng = np.random.default_rng(seed)
        self._script = ([v for shape, fill, size, _ in groups for v in (shape, fill, size)]
                        + ([relation] if relation else []))
        self._counts = [count for *_, count in groups]
        self._flags = [0.0 if len(groups) == 1 else 0.99, 0.0 if border else 0.99]  # rng.random() < 0.45, < 0.3
        self._restart()

    def _restart(self):  # draw_engraving resamples the scene when it does not fit: replay the script
        self._c, self._i, self._f = list(self._script), list(self._counts), list(self._flags)

    def random(self, size=None):
        if size is not None:
            return self._rng.random(size)
        if not self._f:
            self._restart()
        return self._f.pop(0)

    def choice(self, options):
        value = self._c.pop(0)
        assert value in options
        return value

    def integers(self, low, high):
        value = self._i.pop(0)
        assert low <= value < high
        return value

    def uniform(self, *args, **kwargs):
        return self._rng.uniform(*args, **kwargs)

    def normal(self, *args, **kwargs):
        return self._rng.normal(*args, **kwargs)


def _draw(seed, groups, relation=None, border=False, size=64):
    image, caption = draw_engraving(ScriptedRng(seed, groups, relation, border), size)
    phrases = [f"{COUNTS[n - 1]} {sz} {fill} {shape}{'' if n == 1 else 'es' if shape == 'cross' else 's'}"
               for shape, fill, sz, n in groups]
    expected = "an engraving of " + f" {relation} ".join(phrases) + (" within a border" if border else "")
    assert caption == expected  # the scripted scene is the one drawn and captioned
    return np.asarray(image, dtype=np.float64)


def _darkness(pixels):
    return float((255.0 - pixels).mean())


def _ink(pixels):
    return float((pixels < 128).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_word_matches_the_ink(seed):
    dark = {f: _darkness(_draw(seed, [("circle", f, "large", 1)])) for f in FILLS}
    # same circle, same paper: each fill adds ink on top of the outline, black fills it all
    assert dark["black"] > dark["crosshatched"] > dark["hatched"] > dark["outlined"]
    assert dark["black"] > dark["stippled"] > dark["outlined"]
    black, outlined = _ink(_draw(seed, [("circle", "black", "large", 1)])), _ink(
        _draw(seed, [("circle", "outlined", "large", 1)]))
    assert black > 2.5 * outlined


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_and_size_words_match_the_ink(seed):
    ink = {(size, n): _ink(_draw(seed, [("square", "black", size, n)])) for size in SIZES for n in (1, 2, 3)}
    for size in SIZES:
        one, two, three = ink[(size, 1)], ink[(size, 2)], ink[(size, 3)]
        assert 1.4 < two / one < 2.8 and 2.2 < three / one < 4.2  # radii vary within a size class
    for n in (1, 2, 3):
        assert ink[("large", n)] > 2 * ink[("small", n)]


def test_shape_word_matches_the_ink():
    """Same radius, black fill: the inked area follows the shape's geometric area (polygon vs circle)."""
    area = {"circle": math.pi, "hexagon": 3 * math.sqrt(3) / 2, "cross": 8 * 0.34 - 4 * 0.34**2, "diamond": 2.0,
            "square": 2 * 0.95**2, "triangle": 3 * math.sqrt(3) / 4, "star": 5 * 0.42 * math.sin(math.pi / 5)}
    assert set(area) == set(SHAPES)
    for seed in (0, 1):
        ink = {s: _ink(_draw(seed, [(s, "black", "large", 1)], size=96)) for s in SHAPES}
        assert max(ink, key=ink.get) == "circle"
        for s in SHAPES:
            assert ink[s] / ink["circle"] == pytest.approx(area[s] / area["circle"], rel=0.35), s
        assert ink["star"] < ink["square"] < ink["hexagon"] < ink["circle"]


@pytest.mark.parametrize("seed", [0, 3])
def test_relation_names_the_top_or_left_group_first(seed):
    heavy, light = ("star", "black", "large", 2), ("cross", "outlined", "small", 3)
    half = 32
    for first, second, sign in ((heavy, light, 1), (light, heavy, -1)):
        above = _draw(seed, [first, second], "above")
        assert sign * (_ink(above[:half]) - _ink(above[half:])) > 0.03
        left = _draw(seed, [first, second], "to the left of")
        assert sign * (_ink(left[:, :half]) - _ink(left[:, half:])) > 0.03


def _framed(pixels):
    """Share of each side's length along which the outer 5-pixel band holds a drawn line; the smallest side.

    The border's two rules sit at 3% and 5.5% of the side and are drawn one pixel wide at twice the size, so
    they come out grey (about 135) rather than black: anything darker than the paper (236) by a margin counts."""
    inner = slice(8, -8)
    sides = [pixels[:5, inner], pixels[-5:, inner], pixels[inner, :5].T, pixels[inner, -5:].T]
    return min(float((side < 200).any(axis=0).mean()) for side in sides)


@pytest.mark.parametrize("seed", [0, 1])
def test_border_word_matches_a_ruled_frame(seed):
    scene = [("circle", "hatched", "small", 1)]
    assert _framed(_draw(seed, scene, border=True)) > 0.95
    assert _framed(_draw(seed, scene, border=False)) == 0.0


def test_generated_captions_agree_with_generated_images():
    """Without scripting: over real samples, exactly the captions that say so have a ruled frame."""
    images, captions = generate_split(60, 64, seed=6, split_id=0)
    frames = [_framed(np.asarray(img, dtype=np.float64)) for img in images]
    bordered = [f for f, c in zip(frames, captions, strict=True) if c.endswith("within a border")]
    plain = [f for f, c in zip(frames, captions, strict=True) if not c.endswith("within a border")]
    assert len(bordered) >= 5 and len(plain) >= 5
    assert min(bordered) > 0.95 and max(plain) < 0.5


# --- the cached DatasetDict -------------------------------------------------------------------------------


def test_synthetic_dataset_splits_and_content(tmp_path):
    ds = synthetic.synthetic_dataset(12, 5, 32, seed=3, cache_dir=tmp_path)
    assert isinstance(ds, DatasetDict)
    assert set(ds) == {"train", "validation"}
    assert (len(ds["train"]), len(ds["validation"])) == (12, 5)
    assert ds["train"].column_names == ["image", "caption"]
    assert type(ds["train"].features["image"]).__name__ == "Image"
    images, captions = generate_split(5, 32, seed=3, split_id=1)
    assert list(ds["validation"]["caption"]) == captions
    assert _same_images([r["image"].convert("L") for r in ds["validation"]], images)


def test_synthetic_dataset_is_cached_and_keyed_on_settings(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate_split

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_split", counting)
    first = synthetic.synthetic_dataset(6, 3, 16, seed=0, cache_dir=tmp_path)
    assert len(calls) == 2  # train and validation drawn once
    folders = [p.name for p in tmp_path.iterdir()]
    assert len(folders) == 1

    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "generate_split", boom)
    again = synthetic.synthetic_dataset(6, 3, 16, seed=0, cache_dir=tmp_path)
    assert list(again["train"]["caption"]) == list(first["train"]["caption"])
    assert _same_images(list(again["validation"]["image"]), list(first["validation"]["image"]))

    monkeypatch.setattr(synthetic, "generate_split", counting)
    for settings in ((6, 3, 16, 1), (7, 3, 16, 0), (6, 4, 16, 0), (6, 3, 32, 0)):  # seed, sizes, pixels
        train_size, val_size, px, seed = settings
        before = len(calls)
        ds = synthetic.synthetic_dataset(train_size, val_size, px, seed=seed, cache_dir=tmp_path)
        assert len(calls) == before + 2, settings
        assert (len(ds["train"]), len(ds["validation"])) == (train_size, val_size)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 5 and not [n for n in names if n.startswith(".")]  # one folder per key, no temp left
    assert all(f"v{synthetic.GENERATOR_VERSION}" in n for n in names)
