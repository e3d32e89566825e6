"""Images in the user's hands: EXIF-rotated photos train and chat upright; `vir-chat --image` turns a missing,
non-image, truncated or oversized file into one clear line."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from vir.data import images
from vir.data.images import ImageFileError, load_image, open_user_image


def _rotated_jpeg(path):
    """A 40x20 photo stored as 20x40 pixels with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    the left half red, the right half blue once upright."""
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (20, 0, 40, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_when_training_and_chatting(tmp_path):
    _rotated_jpeg(tmp_path / "phone.jpg")
    for image in (load_image("phone.jpg", tmp_path)[0], open_user_image(tmp_path / "phone.jpg")):
        assert image.size == (40, 20)
        left, right = image.getpixel((5, 10)), image.getpixel((35, 10))
        assert left[0] > 200 and left[2] < 60 and right[2] > 200 and right[0] < 60


def test_a_bad_image_on_the_command_line_is_one_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    cases = {"missing.png": "image not found", "text.png": "not an image file", "cut.png": "truncated or corrupt"}
    for name, message in cases.items():
        with pytest.raises(ImageFileError, match=message):
            open_user_image(tmp_path / name)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels: over the limit
    with pytest.raises(ImageFileError, match=r"too large \(64 x 64 pixels\); the limit is 1000 pixels"):
        open_user_image(tmp_path / "ok.png")


@pytest.mark.parametrize("name, message", [("text.png", "not an image file"),
                                           ("pipe.png", "not a regular file but a named pipe")])
def test_vir_chat_reports_a_bad_image_without_a_traceback(tmp_path, capsys, monkeypatch, name, message):
    from vir.cli import chat

    (tmp_path / "text.png").write_text("not an image")
    os.mkfifo(tmp_path / "pipe.png")
    monkeypatch.setattr(chat, "load_run", lambda run_dir: (None, None, None, None))
    with pytest.raises(SystemExit) as exit_info:
        chat.main([str(tmp_path), "--image", str(tmp_path / name), "--prompt", "What?"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vir-chat: ") and message in err and "Traceback" not in err


def test_a_pipe_or_a_folder_given_as_the_image_is_named_for_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it to read would wait for a writer forever
    os.symlink("loop.png", tmp_path / "loop.png")
    cases = {"pipe.png": "not a regular file but a named pipe", ".": "not a regular file but a directory",
             "loop.png": "cannot be read", "a" * 300 + ".png": r"image not found: .* \(File name too long\)"}
    for name, message in cases.items():
        with pytest.raises(ImageFileError, match=message):
            open_user_image(tmp_path / name)
