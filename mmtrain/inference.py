"""Use an exported model: caption and reconstruct images, and retrieve images <-> captions.

Everything here works from the exported ``model/`` folder alone (safetensors weights,
``config.json``, tokenizer files), on CPU or GPU. Images go through the same decoder and transform as
in training (:func:`mmtrain.data.image_transform`, built on :mod:`mmtrain.images`), so the model is
fed bitwise the tensor it would have been fed in training for the same file. A file that is missing
or cannot be decoded for any reason, or a caption row that is not a caption, is reported (a
:class:`Failure` naming it) and skipped; the others are processed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mmtrain.config import ModelConfig
from mmtrain.data import image_transform
from mmtrain.errors import ModelDirError, UserError
from mmtrain.images import ImageDecodeError, image_extensions
from mmtrain.media import reconstruction_grid, to_uint8
from mmtrain.model import MultimodalModel
from mmtrain.sources import jsonl_problem
from mmtrain.tokenizer import encode, load_tokenizer


@dataclass
class Failure:
    """One input that could not be used: ``path`` names the file (and row), ``reason`` is one line."""

    path: str
    reason: str


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[MultimodalModel, object]:
    """(model in eval mode on ``device``, tokenizer) from an exported folder, with clear errors."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelDirError(f"model folder {str(root)!r} does not exist; pass the model/ folder a training run "
                            "exported (e.g. runs/laptop/model)")
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (root / name).is_file()]
    if missing:
        raise ModelDirError(f"{str(root)!r} is not an exported mmtrain model: missing {', '.join(missing)}; "
                            "pass the model/ folder of a finished run")
    try:
        saved = json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{root / 'config.json'}: not valid JSON (line {e.lineno}); re-export the model") from None
    if not isinstance(saved, dict):
        raise ModelDirError(f"{root / 'config.json'}: not a JSON object of model fields; re-export the model")
    fields = dataclasses.fields(ModelConfig)
    # A field added after the model was exported takes its default (the value every model had before
    # the field existed, e.g. image_background); a field this version does not know is refused.
    unknown = sorted(set(saved) - {f.name for f in fields})
    absent = sorted(f.name for f in fields if f.name not in saved
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or absent:
        raise ModelDirError(
            f"{root / 'config.json'} was written by an incompatible mmtrain version "
            f"({'unknown fields: ' + ', '.join(unknown) if unknown else ''}"
            f"{'; ' if unknown and absent else ''}{'missing fields: ' + ', '.join(absent) if absent else ''}); "
            "load it with the mmtrain version that trained it, or retrain")
    try:
        # huggingface_hub print()s "Loading weights from local directory"; predict's stdout is data.
        with contextlib.redirect_stdout(io.StringIO()):
            model = MultimodalModel.from_pretrained(str(root))
    except (RuntimeError, ValueError, OSError) as e:  # shape/key mismatches, unreadable weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelDirError(f"{str(root)!r}: the weights do not load into this mmtrain version's model ({first}); "
                            "load it with the mmtrain version that trained it, or retrain") from None
    tokenizer = load_tokenizer(root)
    if len(tokenizer) != model.config.vocab_size:
        raise ModelDirError(f"{str(root)!r}: the tokenizer has {len(tokenizer)} tokens but the model expects "
                            f"{model.config.vocab_size}; the folder mixes files of different runs")
    return model.to(device).eval(), tokenizer


def _walk_images(folder: Path, extensions: frozenset[str]) -> tuple[list[Path], list[Failure]]:
    """(the image files below ``folder``, sorted; a Failure per subfolder that cannot be listed)."""
    unlisted: list[Failure] = []

    def report(error: OSError) -> None:  # os.walk would skip such a folder without a word
        unlisted.append(Failure(error.filename or str(folder), f"cannot list this folder ({error.strerror})"))

    images = sorted(Path(root, name) for root, _, files in os.walk(folder, onerror=report)
                    for name in files if Path(name).suffix.lower() in extensions)
    return images, unlisted


def find_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Files as given, folders expanded (recursively, sorted) to the image files they hold: those
    with an extension training's imagefolder reads (:func:`mmtrain.images.image_extensions`). A
    folder or subfolder that cannot be listed is a Failure naming it, not an empty folder."""
    extensions = image_extensions()
    found: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            images, unlisted = _walk_images(path, extensions)
            failures += unlisted
            if not images and not unlisted:
                failures.append(Failure(str(path), "folder holds no image files (by extension, as training reads "
                                                   "an image folder: .png, .jpg, .tif, .webp, .pgm, ...)"))
            found += images
        elif path.is_file():
            found.append(path)
        else:
            failures.append(Failure(str(path), "no such file or folder"))
    return found, failures


def load_images(paths: Sequence[Path], config: ModelConfig) -> tuple[list[Path], list[Tensor], list[Failure]]:
    """The model's view of each image, (C, S, S) float32 in [0, 1], by the training transform: (the
    paths that decoded, their tensors, a Failure for each that did not, whatever the decoder raised)."""
    to_tensor = image_transform(config)
    ok, tensors, failures = [], [], []
    for path in paths:
        try:
            tensors.append(to_tensor(path))
            ok.append(path)
        except ImageDecodeError as e:  # the decoder turns any exception for one file into this
            failures.append(Failure(str(path), f"cannot be read as an image: {e}"))
    return ok, tensors, failures


def _batches(paths: Sequence[Path], batch_size: int, progress: bool, what: str) -> Iterator[list[Path]]:
    chunks = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    yield from tqdm(chunks, desc=what, unit="batch", disable=not progress or len(chunks) < 2)


def _out_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A distinct output stem per input file: the file's stem, or the first free ``stem-2``, ``stem-3``…
    (``a.png`` and ``a.jpg`` beside an ``a-2.png`` must not write each other's files). Compared
    case-insensitively, as macOS and Windows file systems compare names."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        if path in names:
            continue
        name, n = path.stem, 1
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}-{n}"
        taken.add(name.lower())
        names[path] = name
    return names


@torch.no_grad()
def predict(model: MultimodalModel, tokenizer: object, paths: Sequence[Path], out_dir: Path | None,
            batch_size: int = 64, max_length: int | None = None, progress: bool = True
            ) -> tuple[list[dict], list[Failure]]:
    """Greedy caption, reconstruction MSE and (with ``out_dir``) reconstruction/|difference| PNGs."""
    device = next(model.parameters()).device
    records: list[dict] = []
    failures: list[Failure] = []
    names = _out_names(paths)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for chunk in _batches(paths, batch_size, progress, "predict"):
        ok, tensors, bad = load_images(chunk, model.config)
        failures += bad
        if not ok:
            continue
        images = torch.stack(tensors).to(device)
        reconstruction = model.reconstruct(images).float().clamp(0, 1)
        mse = (reconstruction - images).pow(2).flatten(1).mean(dim=1).tolist()
        ids = model.generate(images, tokenizer.bos_token_id, tokenizer.eos_token_id, max_length)
        captions = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        for i, path in enumerate(ok):
            record = {"path": str(path), "caption": captions[i], "reconstruction_mse": mse[i]}
            if out_dir is not None:
                stem = names[path]
                files = {"reconstruction": out_dir / f"{stem}.reconstruction.png",
                         "difference": out_dir / f"{stem}.difference.png",
                         "comparison": out_dir / f"{stem}.comparison.png"}
                Image.fromarray(to_uint8(reconstruction[i])).save(files["reconstruction"])
                Image.fromarray(to_uint8((reconstruction[i] - images[i]).abs())).save(files["difference"])
                Image.fromarray(reconstruction_grid(images[i:i + 1], reconstruction[i:i + 1])).save(
                    files["comparison"])
                record.update({k: str(v) for k, v in files.items()})
            records.append(record)
    return records, failures


@torch.no_grad()
def embed_images(model: MultimodalModel, paths: Sequence[Path], batch_size: int = 64, progress: bool = True
                 ) -> tuple[list[Path], Tensor, list[Failure]]:
    """Unit-norm image latents of the readable ``paths`` (N, latent_dim), in order."""
    device = next(model.parameters()).device
    kept: list[Path] = []
    parts: list[Tensor] = []
    failures: list[Failure] = []
    for chunk in _batches(paths, batch_size, progress, "embed images"):
        ok, tensors, bad = load_images(chunk, model.config)
        failures += bad
        if ok:
            kept += ok
            parts.append(F.normalize(model.image_encoder(torch.stack(tensors).to(device)).float(), dim=-1))
    empty = torch.zeros(0, model.config.latent_dim, device=device)
    return kept, torch.cat(parts) if parts else empty, failures


@torch.no_grad()
def embed_captions(model: MultimodalModel, tokenizer: object, captions: Sequence[str]) -> Tensor:
    """Unit-norm caption embeddings in the latent space (N, latent_dim)."""
    device = next(model.parameters()).device
    enc = encode(tokenizer, list(captions), model.config.max_caption_length)
    emb = model.embed_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
    return F.normalize(emb.float(), dim=-1)


def top_k(query: Tensor, keys: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """For each query row, the ``k`` most cosine-similar key rows as (index, similarity)."""
    sim = query @ keys.t()
    values, indices = sim.topk(min(k, keys.shape[0]), dim=1)
    return [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


# Caption files read by datasets' packaged builders, the readers behind imagefolder's metadata files.
CAPTION_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
CAPTION_COLUMNS = ("caption", "text")


def _read_table(file: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows) of a metadata file, read as training reads imagefolder metadata: by
    ``datasets``' json/csv/parquet builders (so a UTF-8 BOM, CSV quoting, ... mean the same thing)."""
    import tempfile

    import datasets

    reader = CAPTION_READERS[file.suffix.lower()]
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its logger.error repeats what we report
    try:
        # A throw-away cache: ranking captions must not leave an Arrow copy of the file behind.
        with tempfile.TemporaryDirectory(prefix="mmtrain-captions-") as cache:
            options = {"sep": "\t"} if file.suffix.lower() == ".tsv" else {}
            table = datasets.load_dataset(reader, data_files=str(file), split="train", cache_dir=cache,
                                          keep_in_memory=True, **options)
            return table.column_names, table.to_list()
    except Exception as e:  # datasets wraps the parser's error (ArrowInvalid, ParserError, ...)
        cause = e.__cause__ or e.__context__ or e
        text = (str(cause).strip() or str(e).strip() or type(cause).__name__).splitlines()[0]
        if reader != "parquet":
            content = _utf8_text(file)
            # datasets fails on an empty table ("corresponds to no data", StopIteration): say so plainly.
            if len([line for line in content.splitlines() if line.strip()]) <= (reader == "csv"):
                raise UserError(f"--captions {str(file)!r}: holds no captions") from None
        problem = jsonl_problem(file, '{"caption": ...}') if reader == "json" else None
        problem = problem or f"cannot be read as {reader} ({text})"
        raise UserError(f"--captions {str(file)!r}: {problem}") from None
    finally:
        datasets.logging.set_verbosity(level)


def _utf8_text(file: Path) -> str:
    """The file's text (a UTF-8 BOM dropped: it is not part of the first caption), or a UserError. A NUL
    byte decodes as UTF-8 but means UTF-16 (what Excel's "Unicode text" and PowerShell 5 write)."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text, where = "\0", f"byte {e.start}"
    else:
        where = f"byte {text.find(chr(0))} is NUL: UTF-16?"
    if "\0" in text:
        raise UserError(f"--captions {str(file)!r}: not UTF-8 text ({where}); save it as UTF-8")
    return text


def read_captions(path: str | Path) -> tuple[list[str], list[Failure]]:
    """Candidate captions for image -> text retrieval, distinct, in file order, and a Failure for each
    row that holds no caption (missing, empty, or not text), which is skipped.

    ``path``: a text file with one caption per line, or a metadata file (``.jsonl``, ``.csv``, also
    ``.tsv``, ``.json``, ``.parquet``) with a ``caption`` or ``text`` column, read by the reader training uses.
    Raises UserError (one line naming the file, and the line where it can) for a file that is missing,
    malformed, has no caption column or no caption at all."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--captions {str(file)!r}: no such file; give a .txt with one caption per line, "
                        "or a metadata.jsonl/.csv with a caption or text column")
    failures: list[Failure] = []
    if file.suffix.lower() in CAPTION_READERS:
        columns, rows = _read_table(file)
        column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if column is None:
            raise UserError(f"--captions {str(file)!r}: no 'caption' or 'text' column (columns: "
                            f"{', '.join(columns) or 'none'})")
        where = [f"row {n}" for n in range(1, len(rows) + 1)]
        if file.suffix.lower() == ".jsonl":  # one row per non-blank line: name the line an editor shows
            text = file.read_bytes().decode("utf-8-sig", errors="replace")
            lines = [f"line {n}" for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
            where = lines if len(lines) == len(rows) else where
        captions = []
        for row, at in zip(rows, where, strict=True):
            value = row[column]
            if isinstance(value, str) and value.strip():
                captions.append(value.strip())
            else:
                what = "missing or empty" if isinstance(value, str) or value is None else f"{value!r}, not text"
                failures.append(Failure(f"{file}: {at}", f"{column!r} is {what}; skipped"))
    else:
        text = _utf8_text(file)
        # Only line breaks end a caption: str.splitlines would also split at a form feed or U+0085.
        captions = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    captions = list(dict.fromkeys(captions))  # rank each distinct caption once
    if not captions:
        first = f" ({failures[0].path}: {failures[0].reason}{' ...' if len(failures) > 1 else ''})" if failures else ""
        raise UserError(f"--captions {str(file)!r}: holds no captions{first}")
    return captions, failures
