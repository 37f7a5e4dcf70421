"""The pictures the pack ships: the Comfy Registry icon and the template browser's pictures.

No host needed. The editor showing them is tested in test_host_frontend.py.
"""
from __future__ import annotations

import glob
import os

import pytest
from PIL import Image

from conftest import PACK_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

MAX_BYTES = 40_000  # a few tens of KB: the editor loads every card's picture


def test_the_registry_icon_is_a_small_square_picture_in_this_repository_on_main():
    with open(os.path.join(PACK_ROOT, "pyproject.toml"), "rb") as file:
        config = tomllib.load(file)
    repository = config["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    icon = config["tool"]["comfy"]["Icon"]
    assert icon.startswith(prefix), icon
    path = os.path.join(PACK_ROOT, *icon.removeprefix(prefix).split("/"))
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width == picture.height <= 400, picture
    assert os.path.getsize(path) < MAX_BYTES


def test_every_template_has_a_small_square_picture_of_its_name():
    templates = glob.glob(os.path.join(PACK_ROOT, "workflows", "*.json"))
    assert templates
    for template in templates:
        path = template.removesuffix(".json") + ".jpg"  # what the editor requests for a pack's template
        with Image.open(path) as picture:
            assert picture.format == "JPEG" and picture.width == picture.height >= 256, (path, picture)
        assert os.path.getsize(path) < MAX_BYTES, path
