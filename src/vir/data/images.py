"""Image loading that never crashes a training run and never reads outside the image folder.

`load_image` returns `(image, status)` with status `ok`, `missing` (no image file there: nothing, a name too
long to exist, a directory or a named pipe instead), `corrupt` (exists but cannot be read or decoded: truncated,
permission denied, a symlink loop), `too_large` (more than `MAX_IMAGE_PIXELS` pixels by its header: never
decoded) or `refused` (the path resolves outside the image folder: `..`, an absolute path elsewhere or a
symlink escaping it, or it holds a NUL byte; such a file is never opened). Nothing but a regular file is ever
opened (a named pipe would block the reader). Every PIL mode comes back as RGB.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from vir.utils.errors import UserError

IMAGE_ASPECT_RATIOS = ("pad", "crop")

logger = logging.getLogger(__name__)

IMAGE_OK = "ok"
IMAGE_MISSING = "missing"
IMAGE_CORRUPT = "corrupt"
IMAGE_REFUSED = "refused"
IMAGE_TOO_LARGE = "too_large"
IMAGE_STATUSES = (IMAGE_OK, IMAGE_MISSING, IMAGE_CORRUPT, IMAGE_REFUSED, IMAGE_TOO_LARGE)

# The decompression-bomb limit, set here rather than left to PIL's global (which any imported library may
# change): PIL's own default, ~89.5 M pixels (9459 x 9459), ~270 MB decoded as RGB. A larger image is refused
# from its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 89_478_485

# Transparent pixels are composited on white, as a browser shows a transparent PNG on a page; a bare
# `convert("RGB")` would instead expose whatever colour happens to be stored under alpha = 0.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def resolve_image_path(path: str, image_folder: Union[str, Path]) -> Optional[Path]:
    """`image_folder / path` with symlinks and `..` resolved, or None when it lies outside `image_folder` or holds
    a NUL byte; `ImageFileError` when it cannot be resolved (a symlink loop: Python 3.11 raises RuntimeError)."""
    try:
        root = Path(image_folder).resolve()
        target = (root / path).resolve()
    except ValueError:  # embedded NUL byte
        return None
    except (OSError, RuntimeError) as err:
        raise _path_error(Path(image_folder) / path, err) from None
    return target if target.is_relative_to(root) else None


def load_image(path: str, image_folder: Union[str, Path],
               min_side: Optional[int] = None) -> tuple[Optional[Image.Image], str]:
    """Open `image_folder / path` fully decoded as RGB; returns `(image or None, status)` (see module doc).
    With `min_side` (the model's input side), a large image comes back reduced (`decoded_rgb`)."""
    try:
        target = resolve_image_path(path, image_folder)
        if target is None:
            return None, IMAGE_REFUSED
        return decode_image_file(target, min_side), IMAGE_OK
    except ImageFileError as err:  # a broken file or path must cost one black image, never the run
        logger.debug("cannot use %s under %s: %s", path, image_folder, err)
        return None, err.status


def too_large(img: Image.Image) -> bool:
    """Whether an opened (not yet decoded) image has more than `MAX_IMAGE_PIXELS` pixels."""
    return img.width * img.height > MAX_IMAGE_PIXELS


def decoded_rgb(img: Image.Image, min_side: Optional[int] = None) -> Image.Image:
    """`img` fully decoded (a truncated file fails here, not in a worker later), turned upright by its EXIF
    orientation (phone photos are stored sideways with a rotate tag), as RGB.

    With `min_side`, an image whose shorter side is at least 4x `min_side` is reduced by the largest integer
    factor that keeps that side >= 2x `min_side` (enough for the processor's own antialiased resize): a JPEG
    is decoded at 1/2, 1/4 or 1/8 scale by its DCT (`draft`), so its full-size pixels never exist; other
    formats are box-reduced (`Image.reduce`) right after decoding, so no full-size copy outlives the load."""
    factor = min(img.size) // (2 * min_side) if min_side else 1
    if factor >= 2 and img.format == "JPEG":
        img.draft(None, (img.width // factor, img.height // factor))  # the smallest DCT scale >= that size
    img.load()
    rgb = to_rgb(ImageOps.exif_transpose(img))
    factor = min(rgb.size) // (2 * min_side) if min_side else 1
    if factor < 2:
        return rgb
    # Whole factor x factor blocks: the right and bottom edges lose under `factor` source pixels (under one
    # output pixel), and the scale stays exactly 1/factor on both axes.
    return rgb.reduce(factor, box=(0, 0, rgb.width // factor * factor, rgb.height // factor * factor))


class ImageFileError(UserError):
    """An image file cannot be used; the message says why and `status` says it as `load_image` does
    (`missing`, `corrupt` or `too_large`)."""

    def __init__(self, message: str, status: str = IMAGE_CORRUPT):
        super().__init__(message)
        self.status = status


# errnos saying no file can be at the path: nothing there, a name over the file system's limit, a file where a
# folder should be
_NO_SUCH_FILE = (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR)
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _path_error(path: Path, err: Exception) -> ImageFileError:
    """The `ImageFileError` for a path the OS refused (`OSError`, `ValueError` for a NUL byte, Python 3.11's
    `RuntimeError` for a symlink loop): `missing` when no file can be there, else `corrupt` (it cannot be read:
    permission denied, a symlink loop, an I/O error)."""
    code, words = getattr(err, "errno", None), getattr(err, "strerror", None) or str(err)
    if isinstance(err, ValueError) or code in _NO_SUCH_FILE:
        return ImageFileError(f"image not found: {path}" + ("" if code == errno.ENOENT else f" ({words})"),
                              IMAGE_MISSING)
    return ImageFileError(f"{path}: cannot be read ({'a symlink loop' if isinstance(err, RuntimeError) else words})")


def _check_regular_file(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "something else")
        raise ImageFileError(f"{path}: not a regular file but {kind}; give an image file", IMAGE_MISSING)


def _open_image_file(path: Path) -> BinaryIO:
    """`path` opened for binary reading when it is a regular file (symlinks followed), else `ImageFileError`
    (`_path_error`; a directory, named pipe or device is `missing` and never opened: reading a pipe waits
    for a writer forever). O_NONBLOCK covers a file swapped for a pipe between the check and the open."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as err:
        raise _path_error(path, err) from None
    _check_regular_file(path, mode)
    try:
        handle = open(path, "rb", opener=_open_nonblocking)
    except OSError as err:
        raise _path_error(path, err) from None
    try:
        _check_regular_file(path, os.fstat(handle.fileno()).st_mode)
    except ImageFileError:
        handle.close()
        raise
    return handle


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # no O_NONBLOCK on Windows, nor named pipes


def decode_image_file(path: Path, min_side: Optional[int] = None) -> Image.Image:
    """A regular file (`_open_image_file`) fully decoded as upright RGB (`decoded_rgb`), or `ImageFileError`
    naming the path and the reason: no such file, unreadable, over the pixel limit by its header (never decoded),
    not an image, truncated or corrupt.
    PIL raises OSError, SyntaxError, ValueError, struct.error, DecompressionBombError... for broken files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit limit below decides
            with _open_image_file(path) as handle, Image.open(handle) as img:
                if too_large(img):
                    raise ImageFileError(f"{path}: image too large ({img.width} x {img.height} pixels); the limit "
                                         f"is {MAX_IMAGE_PIXELS} pixels", IMAGE_TOO_LARGE)
                return decoded_rgb(img, min_side)
    except ImageFileError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own check, at twice its (global) limit
        raise ImageFileError(f"{path}: image too large ({err}); the limit is {MAX_IMAGE_PIXELS} pixels",
                             IMAGE_TOO_LARGE) from None
    except Image.UnidentifiedImageError:
        raise ImageFileError(f"{path}: not an image file PIL can read") from None
    except Exception as err:  # noqa: BLE001 - see above
        raise ImageFileError(f"{path}: the image is truncated or corrupt ({err or type(err).__name__})") from None


def open_user_image(path: Union[str, Path], min_side: Optional[int] = None) -> Image.Image:
    """An image given on a command line (`vir-chat --image`) as upright RGB, or `ImageFileError` naming the path
    and the reason: missing, not a regular file (a directory or named pipe, never opened), unreadable, not an
    image, truncated or corrupt, or over the pixel limit. `min_side` reduces a large image as `decoded_rgb` does."""
    return decode_image_file(Path(path), min_side)


def to_rgb(img: Image.Image, background_rgb: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """A new RGB copy of `img` for any PIL mode.

    Alpha (RGBA, LA, PA, P/L/RGB with a `transparency` entry) is composited on `background_rgb`; 16-bit,
    32-bit integer and float greyscale are scaled to 8 bits (see `_to_uint8`); CMYK/YCbCr/1/L use PIL's
    conversion.
    """
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), img.mode), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*background_rgb, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale single-channel pixels to uint8: 16-bit modes by /257; `I` as 8-bit when it fits, else as 16-bit
    when it fits, else min-max; `F` as [0, 1] when it fits, else as [0, 255] when it fits, else min-max."""
    values = np.nan_to_num(pixels.astype(np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1.0:
        values = values * 255.0
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def expand_to_square(img: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: pad the short side symmetrically with `background_rgb` to a square."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), background_rgb)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def black_image(size: Union[int, tuple[int, int]]) -> Image.Image:
    """An all-black RGB image; `size` is a side length or `(width, height)`."""
    width, height = (size, size) if isinstance(size, int) else size
    return Image.new("RGB", (width, height), (0, 0, 0))


def preprocess_images(images: list, image_processor, image_aspect_ratio: str = "pad") -> torch.Tensor:
    """RGB PIL images -> `pixel_values [N, 3, H, W]` float32, as training sees them.

    `pad`: square each image with the processor's mean colour first (LLaVA-1.5 fine-tuning); `crop`: let the
    processor resize the short side and centre-crop.
    """
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r} (data.image_aspect_ratio); "
                         f"choices: {list(IMAGE_ASPECT_RATIOS)}")
    if image_aspect_ratio == "pad":
        background = tuple(int(mean * 255) for mean in image_processor.image_mean)
        images = [expand_to_square(image, background) for image in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"].float()


def processor_image_size(image_processor: Any) -> tuple[int, int]:
    """`(width, height)` the processor produces: its crop size, else its resize size."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        get = size.get if isinstance(size, Mapping) else (lambda key, s=size: getattr(s, key, None))
        if get("height") and get("width"):
            return int(get("width")), int(get("height"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"cannot tell the output size of {type(image_processor).__name__} (no crop_size/size)")
