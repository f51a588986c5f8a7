"""Built-in synthetic engravings: procedurally drawn, seeded, with captions that say what was drawn.

Each image is one or two groups of identical shapes (kind, fill, size, count) on paper, the groups
placed one above the other or side by side, sometimes inside a ruled border. The caption is generated
from the scene itself, so every word in it can be read off the pixels: that is what makes the
captioning and alignment objectives learnable and their metrics meaningful.

Images are rendered at twice the target size and downsampled, which turns one-pixel hatching into
the grey tones of a real engraving instead of aliasing.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump when drawing or captioning changes: it is part of the cache key.
GENERATOR_VERSION = 2

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
FILLS = ("hatched", "crosshatched", "stippled", "black", "outlined")
SIZES = ("small", "large")
COUNTS = ("a", "two", "three")
# Captions name the top (or left) group first, so one image has one caption: "A below B" would
# describe the same picture as "B above A" and make the caption unpredictable from the pixels.
RELATIONS = ("above", "to the left of")

PAPER, INK = 236, 28


@dataclass(frozen=True)
class Group:
    shape: str
    fill: str
    size: str
    count: int

    def phrase(self) -> str:
        noun = self.shape + ("es" if self.shape == "cross" and self.count > 1 else "s" if self.count > 1 else "")
        return f"{COUNTS[self.count - 1]} {self.size} {self.fill} {noun}"


def caption_for(groups: list[Group], relation: str | None, border: bool) -> str:
    text = "an engraving of " + groups[0].phrase()
    if relation is not None:
        text += f" {relation} {groups[1].phrase()}"
    if border:
        text += " within a border"
    return text


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, start: float, radius: float = r) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + rot + 2 * math.pi * k / n),
                 cy + radius * math.sin(start + rot + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return ring(4, math.pi / 4, r * 0.95)
    if shape == "diamond":
        return ring(4, 0.0)
    if shape == "triangle":
        return ring(3, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, 0.0)
    if shape == "star":
        outer, inner = ring(5, -math.pi / 2), ring(5, -math.pi / 2 + math.pi / 5, r * 0.42)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.34
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _pattern(fill: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ink pattern covering the whole canvas; the shape mask cuts it out."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    spacing = size / rng.uniform(22, 30)
    width = max(1.0, size / 150)

    def hatch(angle: float) -> np.ndarray:
        d = xx * math.cos(angle) + yy * math.sin(angle)
        return np.abs(np.mod(d, spacing) - spacing / 2) < width / 2 + 0.5

    angle = math.radians(45 + rng.uniform(-12, 12))
    if fill == "hatched":
        return hatch(angle)
    if fill == "crosshatched":
        return hatch(angle) | hatch(angle + math.pi / 2)
    if fill == "stippled":
        return rng.random((size, size)) < 0.22
    if fill == "black":
        return np.ones((size, size), dtype=bool)
    return np.zeros((size, size), dtype=bool)  # outlined


def _place(rng: np.random.Generator, group: Group, box: tuple[float, float, float, float], radius: float,
           taken: list[tuple[float, float, float]]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 * radius or y1 - y0 < 2 * radius:
        return None
    centres = []
    for _ in range(group.count):
        for _attempt in range(60):
            cx, cy = rng.uniform(x0 + radius, x1 - radius), rng.uniform(y0 + radius, y1 - radius)
            if all(math.hypot(cx - ox, cy - oy) > radius + orr + 2 for ox, oy, orr in taken):
                taken.append((cx, cy, radius))
                centres.append((cx, cy))
                break
        else:
            return None
    return centres


def _regions(relation: str | None, lo: float, hi: float) -> list[tuple[float, float, float, float]]:
    mid, gap = (lo + hi) / 2, (hi - lo) * 0.03
    top, bottom = (lo, lo, hi, mid - gap), (lo, mid + gap, hi, hi)
    left, right = (lo, lo, mid - gap, hi), (mid + gap, lo, hi, hi)
    return {None: [(lo, lo, hi, hi)], "above": [top, bottom], "to the left of": [left, right]}[relation]


def draw_engraving(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str]:
    """Draw one random scene; returns a grayscale image and its caption."""
    size = image_size * 2
    while True:  # resample the scene until it fits: the caption must describe what is drawn
        n_groups = 1 if rng.random() < 0.45 else 2
        groups = [Group(str(rng.choice(SHAPES)), str(rng.choice(FILLS)), str(rng.choice(SIZES)),
                        int(rng.integers(1, 4))) for _ in range(n_groups)]
        relation = str(rng.choice(RELATIONS)) if n_groups == 2 else None
        border = bool(rng.random() < 0.3)
        margin = size * (0.1 if border else 0.04)
        taken: list[tuple[float, float, float]] = []
        placed = []
        for group, box in zip(groups, _regions(relation, margin, size - margin), strict=True):
            radius = size * (rng.uniform(0.075, 0.095) if group.size == "small" else rng.uniform(0.135, 0.165))
            centres = _place(rng, group, box, radius, taken)
            if centres is None:
                break
            placed.append((group, radius, centres))
        else:
            break

    canvas = np.full((size, size), PAPER, dtype=np.float32) + rng.normal(0, 4, (size, size)).astype(np.float32)
    ink = np.zeros((size, size), dtype=bool)
    line = max(2, size // 90)
    for group, radius, centres in placed:
        mask_img = Image.new("L", (size, size), 0)
        outline_img = Image.new("L", (size, size), 0)
        mask_draw, outline_draw = ImageDraw.Draw(mask_img), ImageDraw.Draw(outline_img)
        for cx, cy in centres:
            if group.shape == "circle":
                bbox = (cx - radius, cy - radius, cx + radius, cy + radius)
                mask_draw.ellipse(bbox, fill=255)
                outline_draw.ellipse(bbox, outline=255, width=line)
            else:
                pts = _polygon(group.shape, cx, cy, radius, math.radians(rng.uniform(-8, 8)))
                mask_draw.polygon(pts, fill=255)
                outline_draw.line([*pts, pts[0]], fill=255, width=line, joint="curve")
        inside = np.asarray(mask_img) > 127
        ink |= (inside & _pattern(group.fill, size, rng)) | (np.asarray(outline_img) > 127)
    if border:
        b = ImageDraw.Draw(border_img := Image.new("L", (size, size), 0))
        for inset in (size * 0.03, size * 0.055):
            b.rectangle((inset, inset, size - inset, size - inset), outline=255, width=max(1, line // 2))
        ink |= np.asarray(border_img) > 127
    canvas[ink] = INK
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="L")
    caption = caption_for([g for g, _, _ in placed], relation, border)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS), caption


def generate_split(n: int, image_size: int, seed: int, split_id: int) -> tuple[list[Image.Image], list[str]]:
    """Sample ``i`` depends only on (seed, split_id, i), so any subset can be regenerated exactly."""
    images, captions = [], []
    for i in range(n):
        image, caption = draw_engraving(np.random.default_rng([seed, split_id, i]), image_size)
        images.append(image)
        captions.append(caption)
    return images, captions


def synthetic_dataset(train_size: int, val_size: int, image_size: int, seed: int, cache_dir: Path):  # -> DatasetDict
    """The synthetic engravings as a ``datasets.DatasetDict`` (train, validation), cached on disk.

    The cache folder name holds every input of the generator, so a second run with the same
    settings loads it instead of drawing again. It is written to a temporary sibling and renamed,
    so a crash or a concurrent job never leaves a half-written cache behind.
    """
    from datasets import Dataset, DatasetDict, Features, Value, load_from_disk
    from datasets import Image as ImageFeature

    key = f"engravings-v{GENERATOR_VERSION}-seed{seed}-train{train_size}-val{val_size}-px{image_size}"
    final = Path(cache_dir) / key
    if (final / "dataset_dict.json").exists():
        return load_from_disk(str(final))
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    splits = {}
    for split_id, (name, n) in enumerate((("train", train_size), ("validation", val_size))):
        images, captions = generate_split(n, image_size, seed, split_id)
        splits[name] = Dataset.from_dict({"image": images, "caption": captions}, features=features)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    DatasetDict(splits).save_to_disk(str(tmp))
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(final))
