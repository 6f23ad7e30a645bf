"""Images for training and evaluation: one reading rule, the demo set, folders, a DataModule.

Every image the project touches (training data, ``streamlic compress``, evaluation) goes
through :func:`load_image`, so the training pipeline and the codec see the same pixels.

Data sources:

- ``demo``: colour photos shipped inside scikit-image, read from its install directory
  (nothing is downloaded), with a fixed train/val/test split (:data:`DEMO_SPLIT`);
- ``folder``: three folders of image files, scanned recursively; unreadable, truncated and
  too-small files are reported once, at setup, and skipped.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Literal, Sequence, Union

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

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


def _as_hw(size: PatchSize, what: str) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair (a list from YAML included) to a positive (h, w)."""
    if isinstance(size, int):
        size_hw = (size, size)
    else:
        size_hw = tuple(int(value) for value in size)
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise DataError(f"{what}={size!r}: expected a positive int or a pair (height, width)")
    return size_hw  # type: ignore[return-value]


@rank_zero_only
def _report_skipped(source: str, reason: str) -> None:
    # Rank zero only: under DDP every rank scans the same files, one report is enough.
    logger.warning("skipping %s: %s", source, reason)


def _probe(path: Path) -> tuple[int, int] | str:
    """Oriented (height, width) of a decodable image, or why it cannot be used."""
    try:
        width, height = _open_decoded(path).size
    except ImageReadError as exc:
        return f"unreadable or truncated image ({exc.__cause__})"
    return height, width


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
    min_hw = _as_hw(min_size, "min_size")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    candidates = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not candidates:
        raise DataError(f"data folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")

    # Decoding releases the GIL, so threads check a large folder several times faster.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probes = list(pool.map(_probe, candidates))

    usable = []
    for path, probe in zip(candidates, probes):
        if isinstance(probe, str):
            _report_skipped(str(path), probe)
        elif probe[0] < min_hw[0] or probe[1] < min_hw[1]:
            reason = f"image is {probe[0]}x{probe[1]}, smaller than the minimum {min_hw[0]}x{min_hw[1]}"
            _report_skipped(str(path), reason)
        else:
            usable.append(path)
    if not usable:
        raise DataError(f"none of the {len(candidates)} image files in data folder {root} is usable (see the warnings)")
    logger.info("data folder %s: %d usable images, %d skipped", root, len(usable), len(candidates) - len(usable))
    return usable


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers: neighbouring epochs, indices or steps share nothing.

    The one seed rule of the project: training crops and order (seed, epoch, index) and the
    training noise of each step (seed, step, rank) depend only on these numbers, so a resumed
    run draws what the uninterrupted run drew.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class ImageListDataset(Dataset):
    """Images from files or in-memory tensors, cropped for training, validation or test.

    Modes:

    - ``"train"``: a random ``patch_size`` crop, flipped horizontally with probability 1/2
      when ``hflip``; each image appears ``repeat`` times per epoch (several crops of it).
    - ``"val"``: the centre ``patch_size`` crop, so batches stack and metrics repeat.
    - ``"test"``: the whole image (use batch size 1; the model pads).

    In train and val mode, images smaller than ``patch_size`` are left out with one warning
    each. Files are read with :func:`load_image` when an item is requested.

    Randomness: with ``seed=None`` crops and flips use torch's global generator (the loading
    process's, so ``lightning.seed_everything(..., workers=True)`` makes them reproducible).
    With a ``seed``, the crop of item ``i`` in epoch ``e`` depends only on ``(seed, e, i)``:
    index the dataset with ``(e, i)`` (as :class:`EpochSeededSampler` does); a plain ``i``
    means epoch 0.
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        mode: Literal["train", "val", "test"] = "train",
        patch_size: PatchSize = 256,
        hflip: bool = True,
        repeat: int = 1,
        seed: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        if mode not in ("train", "val", "test"):
            raise DataError(f"mode={mode!r}: expected 'train', 'val' or 'test'")
        if repeat < 1:
            raise DataError(f"repeat={repeat}: must be at least 1")
        if names is not None and len(names) != len(images):
            raise DataError(f"{len(names)} names for {len(images)} images")
        self.mode = mode
        self.patch_size = _as_hw(patch_size, "patch_size")
        self.hflip = hflip
        self.repeat = repeat
        self.seed = seed

        if names is None:
            names = [self._default_name(image, i) for i, image in enumerate(images)]
        self.images: list[ImageSource] = []
        self.names: list[str] = []
        for name, image in zip(names, images):
            if mode != "test":
                height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else read_image_size(image)
                if height < self.patch_size[0] or width < self.patch_size[1]:
                    patch_h, patch_w = self.patch_size
                    _report_skipped(name, f"image is {height}x{width}, smaller than the patch {patch_h}x{patch_w}")
                    continue
            self.images.append(image)
            self.names.append(name)
        if not self.images:
            raise DataError(
                f"no usable image for the {mode} set: {len(images)} given, none at least "
                f"{self.patch_size[0]}x{self.patch_size[1]}"
            )

    @staticmethod
    def _default_name(image: ImageSource, index: int) -> str:
        return f"image{index}" if isinstance(image, torch.Tensor) else os.fspath(image)

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        source = self.images[index % len(self.images)]
        image = source if isinstance(source, torch.Tensor) else load_image(source)
        if self.mode == "test":
            return image
        patch_h, patch_w = self.patch_size
        height, width = image.shape[-2:]
        if self.mode == "val":
            top, left = (height - patch_h) // 2, (width - patch_w) // 2
            return image[:, top : top + patch_h, left : left + patch_w].contiguous()

        generator = None if self.seed is None else torch.Generator().manual_seed(mixed_seed(self.seed, epoch, index))
        top = int(torch.randint(0, height - patch_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - patch_w + 1, (1,), generator=generator))
        patch = image[:, top : top + patch_h, left : left + patch_w]
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            patch = patch.flip(-1)
        return patch.contiguous()


class EpochSeededSampler(Sampler):
    """Shuffles ``num_items`` indices from ``(seed, epoch)`` and yields ``(epoch, index)`` keys.

    Lightning calls :meth:`set_epoch` at the start of every epoch (resumed runs included, and
    through its distributed wrapper under DDP), so the order and the crops of a seeded
    :class:`ImageListDataset` depend only on the seed and the epoch, not on workers or ranks.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        for index in torch.randperm(self.num_items, generator=generator).tolist():
            yield self.epoch, index


MAX_AUTO_WORKERS = 8


def loader_workers(num_workers: int | str) -> int:
    """DataLoader workers: an int as given, ``"auto"`` one per CPU core but one, at most 8 (0 on one core)."""
    if num_workers == "auto":
        return min(MAX_AUTO_WORKERS, max(0, (os.cpu_count() or 1) - 1))
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"data.num_workers={num_workers!r}: expected a non-negative integer or 'auto'")
    return num_workers


class ResumableDataLoader(DataLoader):
    """A DataLoader whose first pass starts ``skip_batches`` batches in.

    A run resumed from a checkpoint written mid-epoch has already trained on the first batches
    of that epoch; with a seeded order they are the same batches, so skipping them continues
    the epoch exactly where the interrupted run stood. The skip is an ``__init__`` argument
    so that it survives Lightning re-creating the loader (distributed samplers).
    """

    def __init__(self, *args, skip_batches: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        # lazy: the sampler reads its epoch (set by Lightning after iter()) at the first batch
        return itertools.islice(super().__iter__(), skip, None)


class StreamLICDataModule(L.LightningDataModule):
    """Train/val/test data for StreamLIC from the demo photos or from image folders.

    Args:
        source: ``"demo"`` (photos inside scikit-image, split by :data:`DEMO_SPLIT`) or
            ``"folder"`` (``train_dir``, ``val_dir``, ``test_dir``; each needed only by the
            stages that use it: fit needs train and val, validate val, test test).
        patch_size: training crop, an int or (height, width).
        val_patch_size: validation centre crop; ``None`` means ``patch_size``.
        batch_size / val_batch_size: batch sizes (``val_batch_size=None`` means
            ``batch_size``). Test batches are one whole image each.
        repeat: how many random crops of each training image one epoch draws.
        hflip: random horizontal flips in training.
        min_image_size: folder files smaller than this are skipped with a warning;
            ``None`` means the crop size of each split (training and validation) and no
            minimum for test images.
        seed: makes training crops and order depend only on ``(seed, epoch)``
            (:class:`EpochSeededSampler`); ``None`` uses torch's global randomness, which
            ``seed_everything`` makes reproducible.
        num_workers / pin_memory: passed to every DataLoader; ``num_workers="auto"`` sizes the
            workers to the machine (:func:`loader_workers`).

    Folder scans happen in :meth:`setup`, once per split, so each bad file is reported once.
    The module holds no state that a resumed run needs (the epoch comes from the Trainer).
    """

    def __init__(
        self,
        source: Literal["demo", "folder"] = "demo",
        train_dir: str | os.PathLike | None = None,
        val_dir: str | os.PathLike | None = None,
        test_dir: str | os.PathLike | None = None,
        patch_size: PatchSize = 256,
        val_patch_size: PatchSize | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        repeat: int = 1,
        hflip: bool = True,
        min_image_size: PatchSize | None = None,
        seed: int | None = None,
        num_workers: int | Literal["auto"] = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("demo", "folder"):
            raise DataError(f"data.source={source!r}: expected 'demo' or 'folder'")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise DataError(f"data.batch_size={batch_size}, val_batch_size={val_batch_size}: must be at least 1")
        self.save_hyperparameters()
        self.source = source
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.patch_size = _as_hw(patch_size, "data.patch_size")
        self.val_patch_size = _as_hw(patch_size if val_patch_size is None else val_patch_size, "data.val_patch_size")
        self.min_image_size = None if min_image_size is None else _as_hw(min_image_size, "data.min_image_size")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size if val_batch_size is not None else batch_size
        self.repeat = repeat
        self.hflip = hflip
        self.seed = seed
        self.num_workers = loader_workers(num_workers)
        self.pin_memory = pin_memory
        self.train_dataset: ImageListDataset | None = None
        self.val_dataset: ImageListDataset | None = None
        self.test_dataset: ImageListDataset | None = None

    def _split_images(self, split: str, crop_size: tuple[int, int]) -> tuple[list[ImageSource], list[str]]:
        if self.source == "demo":
            pairs = demo_images(split)  # type: ignore[arg-type]
            return [image for _, image in pairs], [name for name, _ in pairs]
        folder = self.dirs[split]
        if folder is None:
            raise DataError(f"data.{split}_dir is not set; source=folder needs it for the {split} set")
        min_size = self.min_image_size or crop_size
        paths = scan_folder(folder, min_size)
        return paths, [os.fspath(path) for path in paths]

    def _build(self, split: Literal["train", "val", "test"]) -> ImageListDataset:
        if split == "train":
            images, names = self._split_images(split, self.patch_size)
            return ImageListDataset(images, "train", self.patch_size, self.hflip, self.repeat, self.seed, names)
        if split == "val":
            images, names = self._split_images(split, self.val_patch_size)
            return ImageListDataset(images, "val", self.val_patch_size, names=names)
        images, names = self._split_images(split, (1, 1))
        return ImageListDataset(images, "test", names=names)

    def setup(self, stage: str | None = None) -> None:
        # Each split is built once: fit followed by test must not rescan (or re-warn).
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build("train")
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build("val")
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._build("test")

    @staticmethod
    def _built(dataset: ImageListDataset | None, split: str) -> ImageListDataset:
        if dataset is None:
            raise DataError(f"the {split} set is not built; call setup() for its stage first")
        return dataset

    def _loader(self, dataset: ImageListDataset, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        return loader_class(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._built(self.train_dataset, "train")
        if self.seed is None:
            return self._loader(dataset, batch_size=self.batch_size, shuffle=True)
        sampler = EpochSeededSampler(len(dataset), self.seed)
        skip = self._batches_already_trained(math.ceil(len(dataset) / self.batch_size))
        return self._loader(dataset, ResumableDataLoader, batch_size=self.batch_size, sampler=sampler,
                            skip_batches=skip)

    def _batches_already_trained(self, batches_per_epoch: int) -> int:
        """Batches of the current epoch that a run resumed mid-epoch has trained (0 otherwise)."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        limit = trainer.limit_train_batches
        if limit is not None:
            batches_per_epoch = min(batches_per_epoch, limit) if isinstance(limit, int) else int(batches_per_epoch * limit)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if 0 < done < batches_per_epoch:
            logger.info("resuming mid-epoch: skipping the %d batches of epoch %d already trained", done,
                     trainer.current_epoch)
            return done
        return 0

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._built(self.val_dataset, "val"), batch_size=self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._built(self.test_dataset, "test"), batch_size=1, shuffle=False)
