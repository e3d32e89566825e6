"""Image loading: every mode to RGB, corrupt / missing / refused paths, LLaVA's square padding."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
from PIL import Image

from vir.data import images as images_module
from vir.data.images import black_image, expand_to_square, load_image


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return root


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path.name


@pytest.mark.parametrize(
    "make, suffix, expected",
    [
        (lambda: Image.new("RGB", (6, 4), (10, 20, 30)), "png", (10, 20, 30)),
        (lambda: Image.new("L", (6, 4), 77), "png", (77, 77, 77)),
        (lambda: Image.new("1", (6, 4), 1), "png", (255, 255, 255)),
        (lambda: Image.new("CMYK", (6, 4), (0, 255, 0, 0)), "jpg", None),  # lossy: checked below
        (lambda: Image.new("RGBA", (6, 4), (200, 0, 0, 0)), "png", (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (6, 4), (200, 0, 0, 255)), "png", (200, 0, 0)),
        (lambda: Image.new("LA", (6, 4), (50, 255)), "png", (50, 50, 50)),
        (lambda: Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)), "png", (255, 255, 255)),  # I;16
        (lambda: Image.fromarray(np.full((4, 6), 257 * 100, dtype=np.uint16)), "png", (100, 100, 100)),
        (lambda: Image.new("I", (6, 4), 128), "tiff", (128, 128, 128)),
        (lambda: Image.new("F", (6, 4), 0.5), "tiff", (128, 128, 128)),
    ],
    ids=["RGB", "L", "1", "CMYK", "RGBA_clear", "RGBA_opaque", "LA", "I16_max", "I16_mid", "I", "F"],
)
def test_every_mode_becomes_rgb(folder, make, suffix, expected):
    name = _save(make(), folder / f"x.{suffix}")
    img, status = load_image(name, folder)
    assert status == "ok" and img.mode == "RGB" and img.size == (6, 4)
    pixel = img.getpixel((0, 0))
    if expected is None:  # CMYK magenta, through JPEG
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] > 200
    else:
        assert pixel == expected


def test_palette_with_transparency(folder):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.putpixel((1, 1), 1)
    name = _save(img, folder / "p.png", transparency=0)
    rgb, status = load_image(name, folder)
    assert status == "ok" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (0, 0, 255)


def test_truncated_and_garbage_files_are_corrupt(folder):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    assert load_image("truncated.png", folder) == (None, "corrupt")
    assert load_image("garbage.jpg", folder) == (None, "corrupt")
    assert load_image("good.png", folder)[1] == "ok"


def test_missing_files_and_directories(folder):
    (folder / "sub").mkdir()
    assert load_image("nope.png", folder) == (None, "missing")
    assert load_image("sub", folder) == (None, "missing")


def _within_seconds(call, seconds: float = 10.0):
    """`call()`'s result, failing (not hanging) the test when it blocks, as reading a named pipe would."""
    result = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"blocked for over {seconds} s"
    return result[0]


def test_paths_the_os_refuses_are_counted_never_raised_nor_blocking(folder, monkeypatch):
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    os.symlink("looping", folder / "looping")
    os.mkfifo(folder / "pipe.png")
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    opened = []
    monkeypatch.setattr(images_module, "open", lambda path, *a, **k: opened.append(path) or open(path, *a, **k),
                        raising=False)
    cases = {"loop_a.png": "corrupt", "looping/x.png": "corrupt", "a" * 300 + ".png": "missing",
             "a" * 300 + "/x.png": "missing", "ok.png/x.png": "missing", "pipe.png": "missing", ".": "missing"}
    for path, status in cases.items():
        assert _within_seconds(lambda: load_image(path, folder)) == (None, status), path
    assert opened == []  # the pipe and the folder were looked at, never opened

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "open", denied, raising=False)  # as root, chmod 000 would still read
    assert load_image("ok.png", folder) == (None, "corrupt")


def test_a_file_swapped_for_a_pipe_after_its_check_is_not_read(folder, monkeypatch):
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    os.mkfifo(folder / "pipe.png")
    regular = os.stat(folder / "ok.png")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: regular if str(path).endswith("pipe.png")
                        else real_stat(path, *a, **k))
    assert _within_seconds(lambda: load_image("pipe.png", folder)) == (None, "missing")


def test_paths_outside_the_folder_are_refused_and_never_opened(folder, tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", folder / "escape.png")
    Image.new("RGB", (4, 4)).save(folder / "inside.png")
    os.symlink(folder / "inside.png", folder / "alias.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(images_module.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))

    for path in ["../outside.png", str(tmp_path / "outside.png"), "escape.png", "sub/../../outside.png", "a\0b"]:
        assert load_image(path, folder) == (None, "refused"), path
    assert opened == []
    assert load_image("alias.png", folder)[1] == "ok"  # a symlink staying inside is fine
    assert load_image(str(folder / "inside.png"), folder)[1] == "ok"


def test_expand_to_square_centres_on_background():
    img = Image.new("RGB", (6, 2), (255, 0, 0))
    square = expand_to_square(img, (1, 2, 3))
    assert square.size == (6, 6)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 5)) == (1, 2, 3)
    assert square.getpixel((0, 2)) == (255, 0, 0) and square.getpixel((5, 3)) == (255, 0, 0)
    tall = expand_to_square(Image.new("RGB", (1, 3), (255, 0, 0)), (0, 0, 0))
    assert tall.size == (3, 3) and tall.getpixel((1, 1)) == (255, 0, 0) and tall.getpixel((0, 1)) == (0, 0, 0)
    assert expand_to_square(square, (0, 0, 0)) is square


def test_black_image():
    assert black_image(5).size == (5, 5)
    img = black_image((4, 3))
    assert img.size == (4, 3) and img.mode == "RGB" and img.getextrema() == ((0, 0),) * 3


def _scene(width: int, height: int) -> Image.Image:
    """A large photo-like image: gradients and waves of about 20 pixels' period once at 112 px."""
    y, x = np.mgrid[0:height, 0:width]
    waves = 127.5 + 127.5 * np.sin(x * 2 * np.pi / (width / 6)) * np.cos(y * 2 * np.pi / (height / 4))
    pixels = np.stack([x * 255 // width, y * 255 // height, waves], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize("suffix, expected_size", [("jpg", (375, 250)), ("png", (342, 228))])
def test_large_images_decode_reduced_and_process_like_the_full_size(folder, suffix, expected_size):
    from transformers import CLIPImageProcessor

    from vir.data.images import preprocess_images

    name = _save(_scene(3000, 2000), folder / f"big.{suffix}", quality=95) if suffix == "jpg" else \
        _save(_scene(2400, 1600), folder / f"big.{suffix}")
    reduced, status = load_image(name, folder, min_side=112)
    full, _ = load_image(name, folder)
    assert status == "ok" and reduced.size == expected_size  # JPEG: 1/8 DCT scale; PNG: box-reduced by 7
    assert min(reduced.size) >= 2 * 112 and full.size[0] > 2000
    processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    for ratio in ("pad", "crop"):
        a = preprocess_images([reduced], processor, ratio)
        b = preprocess_images([full], processor, ratio)
        assert a.shape == b.shape == (1, 3, 112, 112)
        assert float((a - b).abs().mean()) < 0.02  # normalised units: about 1/255  # normalised units: about 1/255


def test_small_images_are_not_reduced(folder):
    name = _save(_scene(400, 300), folder / "small.jpg")
    assert load_image(name, folder, min_side=112)[0].size == (400, 300)
