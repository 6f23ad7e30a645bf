"""Reading images: one rule for every image file, the demo photos, scanning image folders.

Every image the project touches (training data, ``streamlic compress``, evaluation) goes
through :func:`load_image`, so the training pipeline and the codec see the same pixels.
The demo set is colour photos shipped inside scikit-image, read from its install directory
(nothing is downloaded), with a fixed train/val/test split (:data:`DEMO_SPLIT`). Folder
scans report unreadable, truncated and too-small files once and skip them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

logger = logging.getLogger("streamlic.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Photos in skimage/data, by split. The two motorcycle views are a stereo pair of one
# scene, so both stay in train; val and test hold scenes that training never sees.
DEMO_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg"),
    "val": ("ihc.png", "retina.jpg"),
    "test": ("chelsea.png", "rocket.jpg"),
}

ImageSource = Union[str, os.PathLike, torch.Tensor]
PatchSize = Union[int, Sequence[int]]


class ImageReadError(ValueError):
    """A file cannot be decoded as an image (missing, not an image, truncated, corrupt)."""


class DataError(ValueError):
    """A data source cannot provide any usable image, or is configured wrongly."""


# Orientations 5-8 rotate by 90 degrees, so the displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` (so truncation shows up now), upright per EXIF."""
    try:
        with Image.open(path) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return image
    # Pillow's decoders signal corrupt input with many exception types (OSError,
    # SyntaxError, struct.error, DecompressionBombError, ...); all mean "not readable".
    except Exception as exc:
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {exc}") from exc


def _rgb_array(image: Image.Image) -> np.ndarray:
    """Pixels of ``image`` as float32 [H, W, 3] in [0, 1] (the rule of :func:`load_image`)."""
    if image.mode in _SIXTEEN_BIT_GREY_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
        alpha = rgba[..., 3:]
        return (rgba[..., :3] * alpha + (1.0 - alpha)).astype(np.float32)
    return (np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).astype(np.float32)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a float32 tensor [3, H, W] with values in [0, 1].

    This is the project's only conversion rule; the codec and the training data share it:

    - 8-bit channels are divided by 255.
    - 16-bit greyscale (Pillow modes ``I;16*``, and ``I`` as 16-bit PNG/TIFF open) is divided
      by 65535 exactly, not truncated to 8 bits; mode ``I`` values outside [0, 65535] are
      clipped. (Pillow itself reduces 16-bit *colour* PNGs to 8 bits per channel.)
    - Float images (mode ``F``) are taken as already in [0, 1] and clipped to it.
    - Greyscale and bilevel images are replicated to three equal channels.
    - Palette images are expanded to RGB, keeping palette transparency as alpha.
    - Images with alpha (``LA``, ``PA``, ``RGBA``, transparent palettes) are composited onto
      white: ``rgb * alpha + (1 - alpha)``, so alpha 0 gives 1.0 and alpha 1 keeps ``rgb``.
    - Other modes (CMYK, YCbCr, ...) use Pillow's conversion to RGB.
    - The EXIF orientation is applied, so the tensor is the image as viewers show it.
    - Multi-frame files (GIF, TIFF) give their first frame.

    Raises:
        ImageReadError: the file is missing, not an image, truncated or corrupt; the
            message names the file.
    """
    image = _open_decoded(path)
    try:
        pixels = _rgb_array(image)
    except ValueError as exc:  # Pillow has no RGB conversion for this mode
        raise ImageReadError(f"cannot read image {os.fspath(path)}: unsupported mode {image.mode}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image :func:`load_image` would return, from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except Exception as exc:  # see _open_decoded: any failure means "not readable"
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {exc}") from exc
    return height, width


def _demo_path(name: str) -> str:
    import skimage  # local: only the demo source needs scikit-image

    return os.path.join(os.path.dirname(skimage.__file__), "data", name)


def demo_images(split: Literal["train", "val", "test"] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The demo photos as (name, image) pairs, images as from :func:`load_image`.

    The files are read from the installed scikit-image package (``skimage/data``); nothing
    is downloaded. ``split`` selects one part of :data:`DEMO_SPLIT` (5 train, 2 val, 2 test
    photos, by file name); ``None`` returns all of them in split order. Names are file stems.
    """
    if split is None:
        files = [name for names in DEMO_SPLIT.values() for name in names]
    elif split in DEMO_SPLIT:
        files = list(DEMO_SPLIT[split])
    else:
        raise DataError(f"unknown demo split {split!r}; choose one of {sorted(DEMO_SPLIT)}")
    return [(Path(name).stem, load_image(_demo_path(name))) for name in files]


def patch_hw(size: PatchSize, what: str) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair (a list from YAML included) to a positive (h, w)."""
    if isinstance(size, int):
        size_hw = (size, size)
    else:
        size_hw = tuple(int(value) for value in size)
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise DataError(f"{what}={size!r}: expected a positive int or a pair (height, width)")
    return size_hw  # type: ignore[return-value]


def report_skipped(source: str, reason: str) -> None:
    # Rank zero only: under DDP every rank scans the same files, one report is enough. Imported here:
    # Lightning costs seconds at start-up, which the codec commands (no Lightning otherwise) need not pay.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank_zero_only(logger.warning)("skipping %s: %s", source, reason)


def _probe(path: Path) -> tuple[int, int] | str:
    """Oriented (height, width) of a decodable image, or why it cannot be used."""
    try:
        width, height = _open_decoded(path).size
    except ImageReadError as exc:
        return f"unreadable or truncated image ({exc.__cause__})"
    return height, width


def list_image_files(root: Path) -> list[Path]:
    """Files under ``root`` (recursive, sorted) with an image extension, any letter case.

    Raises:
        DataError: ``root`` is missing or holds no image files; the message names it.
    """
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not files:
        raise DataError(f"data folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def scan_folder(root: str | os.PathLike, min_size: PatchSize = 1) -> list[Path]:
    """Image files under ``root`` (recursive) that decode fully and are at least ``min_size``.

    Extensions: png, jpg, jpeg, webp, bmp, tif, tiff, in any letter case. Every file is
    decoded once here, so truncated and corrupt files are found before training starts;
    each unusable file gets one warning with the reason and is left out. ``min_size`` is an
    int or (height, width). Returns the usable files in sorted order.

    Raises:
        DataError: ``root`` is missing, holds no image files, or none of them is usable;
            the message names ``root``.
    """
    root = Path(root).expanduser()
    min_hw = patch_hw(min_size, "min_size")
    candidates = list_image_files(root)

    # Decoding releases the GIL, so threads check a large folder several times faster.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probes = list(pool.map(_probe, candidates))

    usable = []
    for path, probe in zip(candidates, probes):
        if isinstance(probe, str):
            report_skipped(str(path), probe)
        elif probe[0] < min_hw[0] or probe[1] < min_hw[1]:
            reason = f"image is {probe[0]}x{probe[1]}, smaller than the minimum {min_hw[0]}x{min_hw[1]}"
            report_skipped(str(path), reason)
        else:
            usable.append(path)
    if not usable:
        raise DataError(f"none of the {len(candidates)} image files in data folder {root} is usable (see the warnings)")
    logger.info("data folder %s: %d usable images, %d skipped", root, len(usable), len(candidates) - len(usable))
    return usable
