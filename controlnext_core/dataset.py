"""The training data set on disk: which pictures, controls and captions a folder holds, and one pair loaded.

Three layouts, the ones people already have (README "Training"):
- ``folders``: pictures in the folder, controls of the same names in a sibling folder (kohya's ``image_dir`` +
  ``conditioning_data_dir``), captions in ``.txt`` files beside the pictures or one default caption;
- ``metadata``: the official / diffusers layout, a ``metadata.jsonl`` (``.csv``, ``.parquet``) whose columns name the
  picture, the control and the caption;
- ``pictures``: pictures only, their controls made later by one of the pack's preprocessors.

``read_items`` checks the whole folder before anything is trained and lists every problem in one message; it opens
each picture's header (format, size, EXIF orientation), which is cheap, but decodes nothing: a truncated body is found
by ``load_training_pair``, which decodes every pair once when the cache is built, before the first step.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ControlNeXtError

LAYOUTS = ("auto", "folders", "metadata", "pictures")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
ASPECT_TOLERANCE = 0.01
"""A control may differ from its picture's aspect ratio by rounding (a control saved smaller), not by framing."""
PROBLEMS_SHOWN = 20
"""A folder of 50,000 unpaired pictures gets a readable message, not 50,000 lines."""

_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_PICTURE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class TrainingItem:
    """One training pair as files, so a data set of any size is a small list until a pair is loaded."""

    picture: str
    """Absolute path of the picture."""
    control: str | None
    """Absolute path of its control picture; None: the control is made later by a preprocessor."""
    caption: str
    root: str
    """Absolute path of the data set's folder, against which ``key`` is taken."""

    def key(self) -> str:
        """A stable id of the item for a cache: the picture's path relative to the data set's folder, with ``/``."""
        return os.path.relpath(self.picture, self.root).replace(os.sep, "/")


def read_items(root: str, layout: str = "auto", *, control_folder: str = "conditioning_images",
               caption_extension: str = ".txt", default_caption: str = "", image_column: str = "image",
               conditioning_image_column: str = "conditioning_image", caption_column: str = "text",
               metadata_file: str | None = None) -> list[TrainingItem]:
    """The folder's training pairs, sorted by picture path so the same folder always gives the same order.

    ``layout`` "auto" reads a metadata file if the folder holds one (or ``metadata_file`` is named), else the
    ``control_folder`` if it exists, else pictures only. ``control_folder`` and ``metadata_file`` are taken relative
    to ``root`` (an absolute path works too); paths in a metadata file are taken relative to the metadata file's
    folder, as diffusers does. Raises one ControlNeXtError listing every problem found in the folder.
    """
    if layout not in LAYOUTS:
        raise ControlNeXtError(f"Unknown training data layout '{layout}': choose one of {', '.join(LAYOUTS)}.")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ControlNeXtError(f"The training folder '{root}' does not exist or is not a folder: name the folder "
                               f"that holds the pictures.")
    if layout == "auto":
        layout = _detect_layout(root, control_folder, metadata_file)
    if layout == "metadata":
        items, problems = _metadata_items(root, metadata_file, image_column, conditioning_image_column,
                                          caption_column, default_caption)
    else:
        if not caption_extension.startswith(".") or len(caption_extension) < 2:
            raise ControlNeXtError(f"The caption extension '{caption_extension}' is not a file extension: give one "
                                   f"such as '.txt' or '.caption'.")
        control_root = os.path.abspath(os.path.join(root, control_folder)) if layout == "folders" else None
        items, problems = _folder_items(root, control_root, caption_extension, default_caption)
    problems += [problem for item in items for problem in _header_problems(item)]
    if problems:
        raise ControlNeXtError(_problem_list(root, problems))
    return sorted(items, key=lambda item: item.picture)


def load_training_pair(item: TrainingItem, resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The picture and its control as [H, W, 3] float32 in 0..1 (ComfyUI's IMAGE layout without the batch).

    Both are turned upright by their EXIF orientation, their shorter side scaled to ``resolution`` and centre-cropped
    to a square, as the official training data (and Load Training Pictures) do; the control gets the same scale and
    crop relative to its own size, so a control saved smaller still lines up. A control whose aspect ratio differs
    from its picture's by more than 1 % would show another framing: it is refused, naming both files, never
    resized. 16-bit grayscale files (depth maps) keep their range. An unreadable or truncated file is refused by
    name. The control is None where the item has none.
    """
    if resolution < 1:
        raise ControlNeXtError(f"The training resolution must be a positive number of pixels, not {resolution}.")
    picture = _open_upright(item.picture)
    if item.control is None:
        return _square(picture, resolution), None
    control = _open_upright(item.control)
    problem = _aspect_problem(item, picture.size, control.size)
    if problem:
        raise ControlNeXtError(problem)
    return _square(picture, resolution), _square(control, resolution)


def load_picture(path: str, resolution: int) -> torch.Tensor:
    """One picture as [H, W, 3] float32 in 0..1, upright, shorter side scaled and centre-cropped to a
    square (a validation control given by path, as the training pairs are read)."""
    return _square(_open_upright(path), resolution)


def content_digest(path: str) -> str:
    """The sha256 of the file's bytes (hex), read in chunks: a cache key that changes when the content does."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise ControlNeXtError(f"'{path}' cannot be read ({error.strerror or error}): check that it exists and is "
                               f"readable.") from None
    return digest.hexdigest()


# --- layouts ----------------------------------------------------------------------------------------------------

def _detect_layout(root: str, control_folder: str, metadata_file: str | None) -> str:
    if metadata_file is not None or any(os.path.isfile(os.path.join(root, name)) for name in METADATA_FILES):
        return "metadata"
    return "folders" if os.path.isdir(os.path.join(root, control_folder)) else "pictures"


def _picture_names(folder: str) -> list[str]:
    """The picture files directly in ``folder``; hidden files (macOS ``._name.png`` forks) are skipped as glob does."""
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and name.lower().endswith(PICTURE_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, name)))


def _by_stem(names: list[str]) -> dict[str, list[str]]:
    stems: dict[str, list[str]] = {}
    for name in names:
        stems.setdefault(os.path.splitext(name)[0], []).append(name)
    return stems


def _folder_items(root: str, control_root: str | None, caption_extension: str,
                  default_caption: str) -> tuple[list[TrainingItem], list[str]]:
    """The ``folders`` layout (``control_root`` given) or the ``pictures`` layout (None)."""
    pictures = _by_stem(_picture_names(root))
    if not pictures:
        raise ControlNeXtError(f"The training folder '{root}' holds no pictures ({', '.join(PICTURE_SUFFIXES)}): put "
                               f"the pictures directly in it.")
    problems = [f"'{root}' holds several pictures named '{stem}' ({', '.join(names)}): they would share one caption "
                f"and one control; rename all but one." for stem, names in pictures.items() if len(names) > 1]
    controls: dict[str, list[str]] = {}
    if control_root is not None:
        if not os.path.isdir(control_root):
            raise ControlNeXtError(f"The control folder '{control_root}' does not exist: put each picture's control "
                                   f"there under the picture's name, or choose the layout 'pictures' to make the "
                                   f"controls with a preprocessor.")
        controls = _by_stem(_picture_names(control_root))
        problems += [f"'{control_root}' holds several controls named '{stem}' ({', '.join(names)}): keep one."
                     for stem, names in controls.items() if len(names) > 1]
        problems += [f"The picture '{os.path.join(root, names[0])}' has no control: add "
                     f"'{os.path.join(control_root, stem)}' (any of {', '.join(PICTURE_SUFFIXES)}) or remove the "
                     f"picture." for stem, names in pictures.items() if stem not in controls]
        problems += [f"The control '{os.path.join(control_root, names[0])}' has no picture: add "
                     f"'{os.path.join(root, stem)}' (any of {', '.join(PICTURE_SUFFIXES)}) or remove the control."
                     for stem, names in controls.items() if stem not in pictures]
    items = []
    for stem, names in pictures.items():
        caption_path = os.path.join(root, stem + caption_extension)
        caption = default_caption
        if os.path.isfile(caption_path):
            try:
                with open(caption_path, encoding="utf-8-sig") as file:
                    caption = file.read().strip()
            except (OSError, UnicodeDecodeError) as error:
                problems.append(f"The caption '{caption_path}' cannot be read as UTF-8 text ({error}): save it as "
                                f"UTF-8.")
        control = os.path.join(control_root, controls[stem][0]) if stem in controls else None
        items.append(TrainingItem(os.path.join(root, names[0]), control, caption, root))
    return items, problems


def _metadata_items(root: str, metadata_file: str | None, image_column: str, conditioning_image_column: str,
                    caption_column: str, default_caption: str) -> tuple[list[TrainingItem], list[str]]:
    """The ``metadata`` layout: one item per row, each row's files checked to exist."""
    path = _metadata_path(root, metadata_file)
    name = os.path.basename(path)
    try:
        columns, rows = _METADATA_READERS[os.path.splitext(path)[1].lower()](path)
    except UnicodeDecodeError as error:
        raise ControlNeXtError(f"The metadata file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}): "
                               f"save it as UTF-8.") from None
    missing = [column for column in (image_column, conditioning_image_column, caption_column) if column not in columns]
    if missing:
        raise ControlNeXtError(f"The metadata file '{path}' has no column {', '.join(repr(c) for c in missing)} (its "
                               f"columns: {', '.join(columns) or 'none'}): name the columns that hold the picture, "
                               f"the control and the caption (image column, conditioning image column, caption "
                               f"column).")
    if not rows:
        raise ControlNeXtError(f"The metadata file '{path}' has no rows: add one row per training pair.")
    folder = os.path.dirname(path)
    items: list[TrainingItem] = []
    problems: list[str] = []
    first_row: dict[str, str] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{name} {where} is not an object of columns: write one JSON object per line.")
            continue
        picture = _row_file(row, image_column, folder, f"{name} {where}", problems)
        control = _row_file(row, conditioning_image_column, folder, f"{name} {where}", problems)
        caption = row.get(caption_column)
        if caption is None:
            caption = default_caption
        elif not isinstance(caption, str):
            problems.append(f"{name} {where}: the caption column '{caption_column}' holds {type(caption).__name__} "
                            f"{caption!r}, not text: write one caption per row.")
            continue
        if picture is None or control is None:
            continue
        if picture in first_row:
            problems.append(f"{name} {where} names the picture '{picture}' again ({first_row[picture]} did): one row "
                            f"per picture, the cache keys pairs by their picture.")
            continue
        first_row[picture] = where
        items.append(TrainingItem(picture, control, caption, root))
    return items, problems


def _metadata_path(root: str, metadata_file: str | None) -> str:
    if metadata_file is not None:
        path = os.path.abspath(os.path.join(root, metadata_file))
        if os.path.splitext(path)[1].lower() not in _METADATA_READERS:
            raise ControlNeXtError(f"'{path}' is not a metadata file this pack reads: give a .jsonl, .csv or "
                                   f".parquet file.")
        if not os.path.isfile(path):
            raise ControlNeXtError(f"The metadata file '{path}' does not exist: name a file in the training folder.")
        return path
    found = [name for name in METADATA_FILES if os.path.isfile(os.path.join(root, name))]
    if not found:
        raise ControlNeXtError(f"The training folder '{root}' holds no metadata file ({', '.join(METADATA_FILES)}): "
                               f"add one, or choose the layout 'folders' or 'pictures'.")
    if len(found) > 1:
        raise ControlNeXtError(f"The training folder '{root}' holds several metadata files ({', '.join(found)}): "
                               f"name the one to read as the metadata file, or remove the others.")
    return os.path.join(root, found[0])


def _row_file(row: dict[str, Any], column: str, folder: str, where: str, problems: list[str]) -> str | None:
    """The absolute path a row names in ``column``, or None with the problem recorded."""
    value = row.get(column)
    if isinstance(value, dict) and value.get("bytes") is not None:
        problems.append(f"{where}: the column '{column}' holds the picture's bytes, not a file path: save the "
                        f"pictures as files and name them in the metadata.")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: the column '{column}' names no file ({value!r}): give the picture's path, relative "
                        f"to the metadata file's folder.")
        return None
    path = os.path.abspath(os.path.join(folder, value.strip()))
    if not os.path.isfile(path):
        problems.append(f"{where}: the column '{column}' names '{path}', which does not exist: add the file or mend "
                        f"the row.")
        return None
    return path


Rows = list[tuple[str, Any]]
"""Each row with where it is in its file ("line 3", "row 3"), for messages."""


def _read_jsonl(path: str) -> tuple[list[str], Rows]:
    columns: dict[str, None] = {}
    rows: Rows = []
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ControlNeXtError(f"Line {number} of the metadata file '{path}' is not JSON ({error.msg}): write "
                                       f"one JSON object per line.") from None
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
            rows.append((f"line {number}", row))
    return list(columns), rows


def _read_csv(path: str) -> tuple[list[str], Rows]:
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        rows: Rows = [(f"line {reader.line_num}", {key: value or None for key, value in row.items()})
                      for row in reader]
        return list(reader.fieldnames or ()), rows


def _read_parquet(path: str) -> tuple[list[str], Rows]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ControlNeXtError(f"Reading '{path}' needs pyarrow, which this Python does not have: install it (pip "
                               f"install pyarrow) or write the metadata as metadata.jsonl or metadata.csv.") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise ControlNeXtError(f"The metadata file '{path}' is not a readable parquet file ({error}): write it "
                               f"again.") from None
    return list(table.column_names), [(f"row {number}", row) for number, row in enumerate(table.to_pylist(), 1)]


_METADATA_READERS: dict[str, Callable[[str], tuple[list[str], Rows]]] = {
    ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


# --- pictures -----------------------------------------------------------------------------------------------------

def _header_problems(item: TrainingItem) -> list[str]:
    """What opening the headers shows: a file that is no picture, a control framed differently."""
    sizes = []
    problems = []
    for path in (item.picture, item.control):
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                sizes.append(_upright_header_size(image))
        except _PICTURE_ERRORS as error:
            problems.append(_unreadable(path, error))
    if len(sizes) == 2:
        problems += [problem for problem in [_aspect_problem(item, *sizes)] if problem]
    return problems


def _upright_header_size(image: Image.Image) -> tuple[int, int]:
    """Width and height once turned upright, from the header's EXIF only (PNG's ``getexif`` would decode it all)."""
    exif = Image.Exif()
    if image.info.get("exif"):
        exif.load(image.info["exif"])
    width, height = image.size
    return (height, width) if exif.get(_EXIF_ORIENTATION) in _QUARTER_TURNS else (width, height)


def _aspect_problem(item: TrainingItem, picture_size: tuple[int, int], control_size: tuple[int, int]) -> str | None:
    picture_aspect = picture_size[0] / picture_size[1]
    control_aspect = control_size[0] / control_size[1]
    if abs(control_aspect / picture_aspect - 1) <= ASPECT_TOLERANCE:
        return None
    return (f"The control '{item.control}' is {control_size[0]}×{control_size[1]} (aspect {control_aspect:.3f}) but "
            f"its picture '{item.picture}' is {picture_size[0]}×{picture_size[1]} (aspect {picture_aspect:.3f}): a "
            f"control must frame the same scene as its picture, so it is refused, not resized; crop or remake it to "
            f"the picture's aspect ratio.")


def _unreadable(path: str, error: BaseException) -> str:
    return f"'{path}' is not a readable picture ({type(error).__name__}: {error}): replace or remove it."


def _open_upright(path: str) -> Image.Image:
    """The whole file decoded and turned upright: RGB, or 32-bit float for 16-bit grayscale (depth maps)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("F") if image.mode.startswith("I") else image.convert("RGB")
    except _PICTURE_ERRORS as error:
        raise ControlNeXtError(_unreadable(path, error)) from None


def _square(image: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side to ``resolution``, centre crop, [H, W, 3] in 0..1."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return torch.from_numpy(np.repeat(gray[..., None], 3, axis=2))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def problem_lines(problems: list[str]) -> str:
    """The first PROBLEMS_SHOWN problems, a line each, and how many more there are."""
    shown = "\n".join(f"- {problem}" for problem in problems[:PROBLEMS_SHOWN])
    more = f"\n- ... and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
    return shown + more


def _problem_list(root: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return (f"The training folder '{root}' has {len(problems)} problems; mend them and run again:\n"
            f"{problem_lines(problems)}")
