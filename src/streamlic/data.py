"""Training data: seeded datasets of crops, their sampler and loader, the Lightning DataModule.

Data sources: ``demo`` (the demo photos of :mod:`streamlic.images`), ``folder`` (three
folders of image files, scanned recursively; bad files are reported once and skipped) and
``patches`` (training crops from a :class:`~streamlic.patches.PatchStore`, validation and
test from folders or the demo photos). Crops and their order depend only on
``(seed, epoch)`` (:func:`mixed_seed`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Iterator, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .images import (DataError, ImageSource, PatchSize, demo_images, load_image, patch_hw, read_image_size,
                     report_skipped, scan_folder)
from .patches import PatchStore

logger = logging.getLogger("streamlic.data")


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers: neighbouring epochs, indices or steps share nothing.

    The one seed rule of the project: training crops (seed, epoch, index) and the training
    noise of each step (seed, step, rank) depend only on these numbers, and the order of an
    epoch on (seed, epoch) (:class:`EpochSeededSampler`), so a resumed run draws what the
    uninterrupted run drew.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def random_crops(image: torch.Tensor, patch_size: tuple[int, int], hflip: bool, generator: torch.Generator | None,
                 count: int = 1) -> list[torch.Tensor]:
    """``count`` random ``patch_size`` windows of ``image`` [C, H, W], each flipped horizontally with probability 1/2
    when ``hflip``; drawn in order from ``generator`` (torch's global one when ``None``)."""
    patch_h, patch_w = patch_size
    height, width = image.shape[-2:]
    crops = []
    for _ in range(count):
        top = int(torch.randint(0, height - patch_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - patch_w + 1, (1,), generator=generator))
        patch = image[:, top : top + patch_h, left : left + patch_w]
        if hflip and bool(torch.rand(1, generator=generator) < 0.5):
            patch = patch.flip(-1)
        crops.append(patch.contiguous())
    return crops


def _item_generator(seed: int | None, epoch: int, index: int) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(mixed_seed(seed, epoch, index))


def concat_crops(batch: list[torch.Tensor]) -> torch.Tensor:
    """Collate items of several crops each ``[k, C, H, W]`` into one batch of crops."""
    return torch.cat(batch)


def uint8_to_float_batch(batch: list[torch.Tensor]) -> torch.Tensor:
    """Collate uint8 crops into a float32 batch in [0, 1]: ``value / 255``, load_image's value of an 8-bit pixel."""
    return torch.stack(batch).float().div_(255)


class ImageListDataset(Dataset):
    """Images from files or in-memory tensors, cropped for training, validation or test.

    Modes:

    - ``"train"``: a random ``patch_size`` crop, flipped horizontally with probability 1/2
      when ``hflip``; each image gives ``repeat`` crops per epoch. With ``crops_per_image=k``
      one item decodes its image once and returns ``k`` crops ``[k, C, H, W]`` (``repeat``
      must be a multiple of ``k``; the epoch has ``len(images) * repeat / k`` items).
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
        crops_per_image: int = 1,
    ) -> None:
        if mode not in ("train", "val", "test"):
            raise DataError(f"mode={mode!r}: expected 'train', 'val' or 'test'")
        if repeat < 1:
            raise DataError(f"repeat={repeat}: must be at least 1")
        if crops_per_image < 1 or repeat % crops_per_image:
            raise DataError(f"data.crops_per_image={crops_per_image}: must be at least 1 and divide "
                            f"data.repeat={repeat}")
        if names is not None and len(names) != len(images):
            raise DataError(f"{len(names)} names for {len(images)} images")
        self.mode = mode
        self.patch_size = patch_hw(patch_size, "patch_size")
        self.hflip = hflip
        self.repeat = repeat
        self.seed = seed
        self.crops_per_image = crops_per_image
        self.collate = concat_crops if crops_per_image > 1 else None  # the DataLoader's collate_fn

        if names is None:
            names = [self._default_name(image, i) for i, image in enumerate(images)]
        self.images: list[ImageSource] = []
        self.names: list[str] = []
        for name, image in zip(names, images):
            if mode != "test":
                height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else read_image_size(image)
                if height < self.patch_size[0] or width < self.patch_size[1]:
                    patch_h, patch_w = self.patch_size
                    report_skipped(name, f"image is {height}x{width}, smaller than the patch {patch_h}x{patch_w}")
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
        return len(self.images) * self.repeat // self.crops_per_image

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

        crops = random_crops(image, self.patch_size, self.hflip, _item_generator(self.seed, epoch, index),
                             self.crops_per_image)
        return crops[0] if self.crops_per_image == 1 else torch.stack(crops)


class PatchDataset(Dataset):
    """Training crops from a patch store: item ``i`` is store crop ``i``, uint8 ``[3, H, W]``.

    The crop is cut to ``patch_size`` at a random place (the whole stored crop when the sizes
    match) and flipped like :class:`ImageListDataset`'s, seeded the same way: with a ``seed``,
    key ``(epoch, i)`` depends only on ``(seed, epoch, i)``. Batches become float32 in the
    DataLoader (:attr:`collate`): one conversion per batch, on a quarter of the bytes.
    """

    collate = staticmethod(uint8_to_float_batch)

    def __init__(self, store: PatchStore, patch_size: PatchSize = 256, hflip: bool = True,
                 seed: int | None = None) -> None:
        self.store = store
        self.patch_size = patch_hw(patch_size, "data.patch_size")
        self.hflip = hflip
        self.seed = seed
        if self.patch_size[0] > store.crop_size[0] or self.patch_size[1] > store.crop_size[1]:
            raise DataError(f"data.patch_size={list(self.patch_size)}: larger than the crops of the patch store "
                            f"{store.path} ({list(store.crop_size)})")

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = torch.from_numpy(self.store[index])
        return random_crops(image, self.patch_size, self.hflip, _item_generator(self.seed, epoch, index))[0]


class EpochSeededSampler(DistributedSampler):
    """torch's :class:`DistributedSampler` over ``num_items`` indices, yielding ``(epoch, index)`` keys.

    The order is shuffled from ``seed + epoch`` and each of ``num_replicas`` ranks takes its
    own share (the whole order with the defaults, one process). Lightning calls
    :meth:`set_epoch` at the start of every epoch (resumed runs included) and keeps a
    distributed sampler as it is, so under DDP too the order and the crops of a seeded
    dataset depend only on the seed and the epoch, not on workers.
    """

    def __init__(self, num_items: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_items), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # read at the first batch: Lightning sets the epoch after iter()
        for index in super().__iter__():
            yield epoch, index


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
    """Train/val/test data for StreamLIC from the demo photos, image folders or a patch store.

    Args:
        source: ``"demo"`` (photos inside scikit-image, split by :data:`DEMO_SPLIT`),
            ``"folder"`` (``train_dir``, ``val_dir``, ``test_dir``; each needed only by the
            stages that use it: fit needs train and val, validate val, test test) or
            ``"patches"`` (training crops from the patch store at ``path``, written by
            ``streamlic prepare-data``; validation and test from ``val_dir`` and
            ``test_dir``, or the demo photos' val and test sets where these are not set).
        path: the patch store of ``source="patches"``.
        patch_size: training crop, an int or (height, width).
        val_patch_size: validation centre crop; ``None`` means ``patch_size``.
        batch_size / val_batch_size: batch sizes (``val_batch_size=None`` means
            ``batch_size``). Test batches are one whole image each.
        repeat: how many random crops of each training image one epoch draws.
        crops_per_image: crops cut from one decoded training image (demo and folder): a
            batch of ``batch_size`` crops comes from ``batch_size / crops_per_image``
            images, so both ``repeat`` and ``batch_size`` must be multiples of it.
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
        source: Literal["demo", "folder", "patches"] = "demo",
        path: str | os.PathLike | None = None,
        train_dir: str | os.PathLike | None = None,
        val_dir: str | os.PathLike | None = None,
        test_dir: str | os.PathLike | None = None,
        patch_size: PatchSize = 256,
        val_patch_size: PatchSize | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        repeat: int = 1,
        crops_per_image: int = 1,
        hflip: bool = True,
        min_image_size: PatchSize | None = None,
        seed: int | None = None,
        num_workers: int | Literal["auto"] = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("demo", "folder", "patches"):
            raise DataError(f"data.source={source!r}: expected 'demo', 'folder' or 'patches'")
        if source == "patches" and path is None:
            raise DataError("data.path is not set; source=patches trains from the patch store there")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise DataError(f"data.batch_size={batch_size}, val_batch_size={val_batch_size}: must be at least 1")
        if crops_per_image < 1 or batch_size % crops_per_image or (source == "patches" and crops_per_image != 1):
            raise DataError(f"data.crops_per_image={crops_per_image}: must divide data.batch_size={batch_size} "
                            "(and be 1 for source=patches, whose crops are cut already)")
        self.save_hyperparameters()
        self.source = source
        self.path = path
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.patch_size = patch_hw(patch_size, "data.patch_size")
        self.val_patch_size = patch_hw(patch_size if val_patch_size is None else val_patch_size, "data.val_patch_size")
        self.min_image_size = None if min_image_size is None else patch_hw(min_image_size, "data.min_image_size")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size if val_batch_size is not None else batch_size
        self.repeat = repeat
        self.crops_per_image = crops_per_image
        self.hflip = hflip
        self.seed = seed
        self.num_workers = loader_workers(num_workers)
        self.pin_memory = pin_memory
        self.train_dataset: ImageListDataset | PatchDataset | None = None
        self.val_dataset: ImageListDataset | None = None
        self.test_dataset: ImageListDataset | None = None

    def _split_images(self, split: str, crop_size: tuple[int, int]) -> tuple[list[ImageSource], list[str]]:
        if self.source == "demo" or (self.source == "patches" and self.dirs[split] is None):
            pairs = demo_images(split)  # type: ignore[arg-type]
            return [image for _, image in pairs], [name for name, _ in pairs]
        folder = self.dirs[split]
        if folder is None:
            raise DataError(f"data.{split}_dir is not set; source=folder needs it for the {split} set")
        min_size = self.min_image_size or crop_size
        paths = scan_folder(folder, min_size)
        return paths, [os.fspath(path) for path in paths]

    def _build(self, split: Literal["train", "val", "test"]) -> ImageListDataset | PatchDataset:
        if split == "train" and self.source == "patches":
            return PatchDataset(PatchStore(self.path), self.patch_size, self.hflip, self.seed)
        if split == "train":
            images, names = self._split_images(split, self.patch_size)
            return ImageListDataset(images, "train", self.patch_size, self.hflip, self.repeat, self.seed, names,
                                    self.crops_per_image)
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
    def _built(dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            raise DataError(f"the {split} set is not built; call setup() for its stage first")
        return dataset

    def _loader(self, dataset: Dataset, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        return loader_class(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._built(self.train_dataset, "train")
        # items of several crops: a batch of batch_size crops holds batch_size / crops_per_image items
        batching = {"batch_size": self.batch_size // self.crops_per_image, "collate_fn": dataset.collate}
        if self.seed is None:
            return self._loader(dataset, shuffle=True, **batching)
        trainer = self.trainer
        sampler = EpochSeededSampler(len(dataset), self.seed, trainer.world_size if trainer else 1,
                                     trainer.global_rank if trainer else 0)
        skip = self._batches_already_trained(math.ceil(len(sampler) / batching["batch_size"]))  # this rank's
        return self._loader(dataset, ResumableDataLoader, sampler=sampler, skip_batches=skip, **batching)

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
