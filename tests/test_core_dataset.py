"""Core tests: the training data set on disk (controlnext_core/dataset.py): each layout, each bad input, one pair
loaded at the training resolution (plain torch + PIL, no ComfyUI)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from controlnext_core.dataset import (LAYOUTS, PROBLEMS_SHOWN, TrainingItem, content_digest, load_training_pair,
                                      read_items)
from controlnext_core.errors import ControlNeXtError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def picture(path, size=(64, 48), color=RED, **save_options) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, **save_options)
    return str(path)


def write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def pairs_folder(root, stems=("a", "b"), control_folder="conditioning_images"):
    for stem in stems:
        picture(root / f"{stem}.png")
        picture(root / control_folder / f"{stem}.png", color=BLUE)
    return root


def metadata_folder(root):
    """The diffusers layout: pictures and controls in subfolders, named relative to the metadata file."""
    for stem in ("x", "y"):
        picture(root / "images" / f"{stem}.jpg")
        picture(root / "conditioning" / f"{stem}.png", color=BLUE)
    return root


# --- layouts -------------------------------------------------------------------------------------------------------

def test_folders_pair_pictures_and_controls_by_name_with_captions_beside_the_pictures(tmp_path):
    picture(tmp_path / "b.jpg")
    picture(tmp_path / "a.png")
    write(tmp_path / "a.txt", "\ufeffa red square\n")
    picture(tmp_path / "conditioning_images" / "a.webp", color=BLUE)  # any picture extension
    picture(tmp_path / "conditioning_images" / "b.png", color=BLUE)
    write(tmp_path / "notes.md", "not a picture")
    write(tmp_path / "._a.png", "a macOS resource fork, not a picture")
    items = read_items(str(tmp_path), default_caption="a picture")
    assert items == [
        TrainingItem(str(tmp_path / "a.png"), str(tmp_path / "conditioning_images" / "a.webp"), "a red square",
                     str(tmp_path)),
        TrainingItem(str(tmp_path / "b.jpg"), str(tmp_path / "conditioning_images" / "b.png"), "a picture",
                     str(tmp_path)),
    ]
    assert read_items(str(tmp_path), "folders", default_caption="a picture") == items
    assert [item.key() for item in items] == ["a.png", "b.jpg"]


def test_the_control_folder_and_caption_extension_are_the_users_to_name(tmp_path):
    pairs_folder(tmp_path, stems=("a",), control_folder="canny")
    write(tmp_path / "a.caption", "from a .caption file")
    write(tmp_path / "a.txt", "not this one")
    items = read_items(str(tmp_path), control_folder="canny", caption_extension=".caption")
    assert [(item.control, item.caption) for item in items] == [(str(tmp_path / "canny" / "a.png"),
                                                                 "from a .caption file")]
    with pytest.raises(ControlNeXtError, match="'txt' is not a file extension"):
        read_items(str(tmp_path), control_folder="canny", caption_extension="txt")


def test_a_sibling_control_folder_is_named_by_a_relative_path(tmp_path):
    picture(tmp_path / "images" / "a.png")
    picture(tmp_path / "controls" / "a.png", color=BLUE)
    items = read_items(str(tmp_path / "images"), "folders", control_folder="../controls")
    assert [item.control for item in items] == [os.path.abspath(tmp_path / "controls" / "a.png")]


def test_metadata_jsonl_names_pictures_relative_to_its_folder(tmp_path):
    metadata_folder(tmp_path)
    pairs_folder(tmp_path, stems=("ignored",))  # a metadata file wins over a control folder in 'auto'
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"image": "images/y.jpg", "conditioning_image": "conditioning/y.png", "text": "second"},
        {"image": "images/x.jpg", "conditioning_image": str(tmp_path / "conditioning" / "x.png"), "text": None},
    ])
    items = read_items(str(tmp_path), default_caption="default")
    assert items == [
        TrainingItem(str(tmp_path / "images" / "x.jpg"), str(tmp_path / "conditioning" / "x.png"), "default",
                     str(tmp_path)),
        TrainingItem(str(tmp_path / "images" / "y.jpg"), str(tmp_path / "conditioning" / "y.png"), "second",
                     str(tmp_path)),
    ]
    assert [item.key() for item in items] == ["images/x.jpg", "images/y.jpg"]


def test_metadata_csv_with_the_users_column_names_and_file_name(tmp_path):
    metadata_folder(tmp_path)
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["file_name", "source", "prompt"])
        writer.writerow(["images/x.jpg", "conditioning/x.png", "a caption, with a comma"])
        writer.writerow(["images/y.jpg", "conditioning/y.png", ""])
    items = read_items(str(tmp_path), metadata_file="pairs.csv", image_column="file_name",
                       conditioning_image_column="source", caption_column="prompt", default_caption="default")
    assert [(item.key(), item.caption) for item in items] == [("images/x.jpg", "a caption, with a comma"),
                                                              ("images/y.jpg", "default")]
    assert items[0].control == str(tmp_path / "conditioning" / "x.png")


def test_metadata_parquet_where_pyarrow_is_installed(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet
    metadata_folder(tmp_path)
    table = pyarrow.table({"image": ["images/x.jpg"], "conditioning_image": ["conditioning/x.png"], "text": ["hi"]})
    pyarrow.parquet.write_table(table, tmp_path / "metadata.parquet")
    items = read_items(str(tmp_path))
    assert [(item.key(), item.control, item.caption) for item in items] == [
        ("images/x.jpg", str(tmp_path / "conditioning" / "x.png"), "hi")]


def test_metadata_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it fails, installed or not
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    write(tmp_path / "metadata.parquet", "")
    with pytest.raises(ControlNeXtError, match=r"needs pyarrow.*pip install pyarrow.*metadata\.jsonl"):
        read_items(str(tmp_path))


def test_pictures_only_have_no_control_yet(tmp_path):
    pairs_folder(tmp_path, stems=("a",))
    picture(tmp_path / "b.png")
    write(tmp_path / "b.txt", "b")
    items = read_items(str(tmp_path), "pictures")  # the control folder is not read
    assert [(item.key(), item.control, item.caption) for item in items] == [("a.png", None, ""), ("b.png", None, "b")]
    assert read_items(str(tmp_path), control_folder="absent") == items  # 'auto' without a control folder


# --- bad input -----------------------------------------------------------------------------------------------------

def test_unknown_layout_and_missing_folder(tmp_path):
    with pytest.raises(ControlNeXtError, match="choose one of " + ", ".join(LAYOUTS)):
        read_items(str(tmp_path), "kohya")
    with pytest.raises(ControlNeXtError, match="does not exist or is not a folder"):
        read_items(str(tmp_path / "absent"))


@pytest.mark.parametrize("layout", ["auto", "folders", "pictures"])
def test_an_empty_folder_is_refused(tmp_path, layout):
    os.makedirs(tmp_path / "conditioning_images")
    write(tmp_path / "a.txt", "a caption without its picture")
    with pytest.raises(ControlNeXtError, match=f"'{tmp_path}' holds no pictures"):
        read_items(str(tmp_path), layout)


def test_folders_without_the_control_folder_point_to_the_pictures_layout(tmp_path):
    picture(tmp_path / "a.png")
    with pytest.raises(ControlNeXtError, match="conditioning_images' does not exist.*layout 'pictures'"):
        read_items(str(tmp_path), "folders")


def test_every_unpaired_file_is_named_in_one_message(tmp_path):
    pairs_folder(tmp_path, stems=("paired",))
    picture(tmp_path / "lonely.png")
    picture(tmp_path / "conditioning_images" / "orphan.png")
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    message = str(raised.value)
    assert "has 2 problems" in message
    assert f"The picture '{tmp_path / 'lonely.png'}' has no control" in message
    assert f"The control '{tmp_path / 'conditioning_images' / 'orphan.png'}' has no picture" in message


def test_pictures_or_controls_sharing_a_name_are_refused(tmp_path):
    pairs_folder(tmp_path, stems=("a",))
    picture(tmp_path / "a.jpg")
    picture(tmp_path / "conditioning_images" / "a.jpg")
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    assert "several pictures named 'a' (a.jpg, a.png)" in str(raised.value)
    assert "several controls named 'a' (a.jpg, a.png)" in str(raised.value)


def test_a_long_list_of_problems_is_cut_short(tmp_path):
    for number in range(PROBLEMS_SHOWN + 5):
        picture(tmp_path / f"{number:03d}.png", size=(4, 4))
    os.makedirs(tmp_path / "conditioning_images")
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    message = str(raised.value)
    assert f"has {PROBLEMS_SHOWN + 5} problems" in message and "... and 5 more" in message
    assert message.count("has no control") == PROBLEMS_SHOWN


def test_a_caption_that_is_not_utf8_is_named(tmp_path):
    picture(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ControlNeXtError, match=f"caption '{tmp_path / 'a.txt'}' cannot be read as UTF-8"):
        read_items(str(tmp_path))


def test_a_metadata_file_without_a_column_lists_the_columns_it_has(tmp_path):
    metadata_folder(tmp_path)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "images/x.jpg", "conditioning_image": "conditioning/x.png",
                                               "text": "x"}])
    with pytest.raises(ControlNeXtError, match=r"has no column 'image' \(its columns: file_name, "
                                               r"conditioning_image, text\)"):
        read_items(str(tmp_path))
    with open(tmp_path / "metadata.csv", "w", encoding="utf-8") as file:
        file.write("image,text\nimages/x.jpg,x\n")
    with pytest.raises(ControlNeXtError, match=r"has no column 'conditioning_image' \(its columns: image, text\)"):
        read_items(str(tmp_path), metadata_file="metadata.csv")


def test_metadata_rows_naming_missing_files_are_listed_by_line(tmp_path):
    metadata_folder(tmp_path)
    write_jsonl(tmp_path / "metadata.jsonl", [
        {"image": "images/x.jpg", "conditioning_image": "conditioning/x.png", "text": "fine"},
        {"image": "images/gone.jpg", "conditioning_image": "conditioning/y.png", "text": "no picture"},
        {"image": "images/y.jpg", "conditioning_image": "conditioning/gone.png", "text": "no control"},
        {"image": "images/y.jpg", "conditioning_image": "", "text": "empty"},
    ])
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    message = str(raised.value)
    assert "has 3 problems" in message
    assert f"metadata.jsonl line 2: the column 'image' names '{tmp_path / 'images' / 'gone.jpg'}', which does not " \
           f"exist" in message
    assert f"metadata.jsonl line 3: the column 'conditioning_image' names " \
           f"'{tmp_path / 'conditioning' / 'gone.png'}'" in message
    assert "metadata.jsonl line 4: the column 'conditioning_image' names no file ('')" in message


def test_metadata_rows_that_cannot_be_pairs(tmp_path):
    metadata_folder(tmp_path)
    row = {"image": "images/x.jpg", "conditioning_image": "conditioning/x.png", "text": "x"}
    write_jsonl(tmp_path / "metadata.jsonl", [row, row, {**row, "image": {"bytes": "iVBOR", "path": None}},
                                              {**row, "text": ["two", "captions"]}, ["not", "an", "object"]])
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    message = str(raised.value)
    assert "line 2 names the picture" in message and "again (line 1 did)" in message
    assert "line 3: the column 'image' holds the picture's bytes, not a file path" in message
    assert "line 4: the caption column 'text' holds list" in message
    assert "line 5 is not an object of columns" in message


def test_metadata_that_cannot_be_read(tmp_path):
    write(tmp_path / "metadata.jsonl", '{"image": "x.png"}\n{"image": \n')
    with pytest.raises(ControlNeXtError, match="Line 2 of the metadata file .* is not JSON"):
        read_items(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_bytes('{"image": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ControlNeXtError, match="is not UTF-8 text"):
        read_items(str(tmp_path))
    write(tmp_path / "metadata.jsonl", "\n")
    with pytest.raises(ControlNeXtError, match="has no column 'image', 'conditioning_image', 'text'"):
        read_items(str(tmp_path))
    write(tmp_path / "metadata.csv", "image,conditioning_image,text\n")
    os.remove(tmp_path / "metadata.jsonl")
    with pytest.raises(ControlNeXtError, match="has no rows"):
        read_items(str(tmp_path))


def test_the_metadata_file_is_found_once_or_named(tmp_path):
    write(tmp_path / "metadata.jsonl", "")
    write(tmp_path / "metadata.csv", "")
    with pytest.raises(ControlNeXtError, match=r"several metadata files \(metadata.jsonl, metadata.csv\)"):
        read_items(str(tmp_path))
    with pytest.raises(ControlNeXtError, match="give a .jsonl, .csv or .parquet file"):
        read_items(str(tmp_path), metadata_file="metadata.json")
    with pytest.raises(ControlNeXtError, match="'.*absent.csv' does not exist"):
        read_items(str(tmp_path), metadata_file="absent.csv")
    os.remove(tmp_path / "metadata.jsonl")
    os.remove(tmp_path / "metadata.csv")
    with pytest.raises(ControlNeXtError, match="holds no metadata file"):
        read_items(str(tmp_path), "metadata")


def test_a_file_that_is_no_picture_is_named_before_training(tmp_path):
    pairs_folder(tmp_path, stems=("a", "b"))
    write(tmp_path / "a.png", "text saved as a .png")
    (tmp_path / "conditioning_images" / "b.png").write_bytes(b"")
    with pytest.raises(ControlNeXtError) as raised:
        read_items(str(tmp_path))
    message = str(raised.value)
    assert f"'{tmp_path / 'a.png'}' is not a readable picture (UnidentifiedImageError" in message
    assert f"'{tmp_path / 'conditioning_images' / 'b.png'}' is not a readable picture" in message


def test_a_truncated_picture_is_named_when_it_is_loaded(tmp_path):
    path = picture(tmp_path / "a.jpg", size=(256, 256), quality=95)
    picture(tmp_path / "conditioning_images" / "a.png", size=(256, 256))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    [item] = read_items(str(tmp_path))  # its header is whole
    with pytest.raises(ControlNeXtError, match=f"'{path}' is not a readable picture \\(OSError: image file is "
                                               f"truncated"):
        load_training_pair(item, 64)


def test_a_control_of_another_aspect_ratio_is_refused_naming_both_files(tmp_path):
    picture(tmp_path / "a.png", size=(300, 200))
    picture(tmp_path / "conditioning_images" / "a.png", size=(150, 101))  # within 1 %: a control saved smaller
    [item] = read_items(str(tmp_path))
    assert load_training_pair(item, 32)[1].shape == (32, 32, 3)
    control = picture(tmp_path / "conditioning_images" / "a.png", size=(150, 98))  # 2 % off
    with pytest.raises(ControlNeXtError, match=f"The control '{control}' is 150×98 .* its picture "
                                               f"'{tmp_path / 'a.png'}' is 300×200 .* refused, not resized"):
        read_items(str(tmp_path))
    with pytest.raises(ControlNeXtError, match=f"The control '{control}' is 150×98"):
        load_training_pair(item, 32)


def test_exif_orientation_counts_for_the_aspect_ratio_and_the_pixels(tmp_path):
    """A phone's portrait photo is stored landscape with an EXIF turn; its control is drawn upright."""
    stored = Image.new("RGB", (80, 40), RED)
    stored.paste(GREEN, (0, 0, 40, 40))  # left half green: the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise
    stored.save(tmp_path / "a.jpg", exif=exif, quality=100)
    picture(tmp_path / "conditioning_images" / "a.png", size=(40, 80))
    [item] = read_items(str(tmp_path))
    image, control = load_training_pair(item, 40)
    top, bottom = image[:10].mean(dim=(0, 1)), image[-10:].mean(dim=(0, 1))
    assert top[1] > 0.9 > top[0] and bottom[0] > 0.9 > bottom[1]
    assert control.shape == image.shape == (40, 40, 3)


# --- one pair loaded ---------------------------------------------------------------------------------------------

def framed(size, border: int) -> Image.Image:
    """Green in the centre square, red outside it: what a centre crop keeps is green."""
    image = Image.new("RGB", size, RED)
    image.paste(GREEN, (border, 0, border + size[1], size[1]))
    return image


def test_the_picture_and_its_control_get_the_same_scale_and_centre_crop(tmp_path):
    framed((400, 200), 100).save(tmp_path / "a.png")
    os.makedirs(tmp_path / "conditioning_images")
    framed((200, 100), 50).save(tmp_path / "conditioning_images" / "a.png")  # the control at half size
    [item] = read_items(str(tmp_path))
    image, control = load_training_pair(item, 64)
    assert image.dtype == control.dtype == torch.float32
    assert image.shape == control.shape == (64, 64, 3)
    inner = (slice(None), slice(2, -2))  # bilinear blurs the crop's edge by a pixel or two
    assert torch.all(image[inner][..., 1] > 0.99) and torch.all(image[inner][..., 0] < 0.01)
    assert torch.allclose(image[inner], control[inner], atol=1e-6)


def test_pictures_load_at_the_training_resolution_from_larger_and_smaller_files(tmp_path):
    item = TrainingItem(picture(tmp_path / "small.png", size=(30, 20), color=(0, 51, 255)), None, "", str(tmp_path))
    image, control = load_training_pair(item, 48)
    assert control is None
    assert image.shape == (48, 48, 3)
    assert torch.allclose(image[0, 0], torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(ControlNeXtError, match="positive number of pixels, not 0"):
        load_training_pair(item, 0)


def test_a_16_bit_depth_control_keeps_its_range(tmp_path):
    picture(tmp_path / "a.png")
    os.makedirs(tmp_path / "conditioning_images")
    Image.fromarray(np.full((48, 64), 16384, dtype=np.uint16)).save(tmp_path / "conditioning_images" / "a.png")
    [item] = read_items(str(tmp_path))
    _, control = load_training_pair(item, 32)
    assert torch.allclose(control, torch.full((32, 32, 3), 16384 / 65535))


def test_content_digest_is_the_sha256_of_the_bytes(tmp_path):
    data = np.random.default_rng(0).bytes(3 << 20)  # more than one read
    (tmp_path / "big.bin").write_bytes(data)
    assert content_digest(str(tmp_path / "big.bin")) == hashlib.sha256(data).hexdigest()
    (tmp_path / "big.bin").write_bytes(data[:-1] + b"\0")
    assert content_digest(str(tmp_path / "big.bin")) != hashlib.sha256(data).hexdigest()
    with pytest.raises(ControlNeXtError, match="'.*absent.png' cannot be read"):
        content_digest(str(tmp_path / "absent.png"))
