"""The patch store: uint8 training crops in memory-mapped ``.npy`` shards with a JSON index.

``streamlic prepare-data SRC DST`` (:func:`prepare_store`) decodes every image under SRC once
with :func:`~streamlic.images.load_image`, takes crops on a grid (``stride``) or at seeded
random places (``crops_per_image``), and writes them as ``[N, 3, H, W]`` uint8 arrays, one
shard per group of source images. ``data=patches`` reads them back (:class:`PatchStore`)
without decoding anything, so a training crop costs a memory copy instead of a PNG decode.

Layout of DST: ``plan.json`` (the inputs and options, written first), ``shards/NNNNN.npy``
with a ``shards/NNNNN.json`` receipt written after each shard (crops, SHA-256, skipped files),
and ``index.json`` (written last: every shard, the crop count and a checksum of the content).
A rerun of the same command finishes an interrupted store and keeps the shards it finished.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .images import DataError, ImageReadError, PatchSize, list_image_files, load_image, patch_hw, report_skipped

logger = logging.getLogger("streamlic.data")

STORE_FORMAT = "streamlic-patches"
STORE_VERSION = 1
PLAN_NAME = "plan.json"
INDEX_NAME = "index.json"
SHARD_DIR = "shards"


def crop_places(height: int, width: int, plan: dict[str, Any], image_index: int) -> list[tuple[int, int]]:
    """(top, left) of every crop the plan takes from an image of this size (the ``image_index``-th source)."""
    crop_h, crop_w = plan["crop_size"]
    if plan["crops_per_image"] is None:
        stride_h, stride_w = plan["stride"]
        return [(top, left) for top in range(0, height - crop_h + 1, stride_h)
                for left in range(0, width - crop_w + 1, stride_w)]
    rng = np.random.default_rng([plan["seed"], image_index])
    count = plan["crops_per_image"]
    tops = rng.integers(0, height - crop_h + 1, count)
    lefts = rng.integers(0, width - crop_w + 1, count)
    return [(int(top), int(left)) for top, left in zip(tops, lefts)]


def image_crops(path: Path, plan: dict[str, Any], image_index: int) -> np.ndarray | str:
    """The plan's uint8 crops ``[n, 3, h, w]`` of one image file, or why the file is skipped."""
    try:
        image = load_image(path)
    except ImageReadError as exc:
        return f"unreadable or truncated image ({exc.__cause__})"
    height, width = image.shape[-2:]
    crop_h, crop_w = plan["crop_size"]
    if height < crop_h or width < crop_w:
        return f"image is {height}x{width}, smaller than the crop {crop_h}x{crop_w}"
    # load_image's rule divides 8-bit values by 255, so rounding recovers them exactly
    pixels = image.mul(255).round_().to(torch.uint8).numpy()
    return np.stack([pixels[:, top : top + crop_h, left : left + crop_w]
                     for top, left in crop_places(height, width, plan, image_index)])


def _shard_paths(dst: Path, shard: int) -> tuple[Path, Path]:
    stem = dst / SHARD_DIR / f"{shard:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _write_json(path: Path, content: Any) -> None:
    from .codec.io import write_atomically  # the project's one atomic write; the codec is not needed to read

    text = json.dumps(content, indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda file: file.write(text.encode()), force=True)


def _write_shard(dst: Path, plan: dict[str, Any], shard: int) -> dict[str, Any]:
    """Crop the shard's source images and write its array, then its receipt (both atomically)."""
    from .codec.io import write_atomically

    per_shard = plan["images_per_shard"]
    first = shard * per_shard
    crops, skipped = [], []
    for image_index, name in enumerate(plan["sources"][first : first + per_shard], start=first):
        result = image_crops(Path(plan["source_dir"]) / name, plan, image_index)
        if isinstance(result, str):
            skipped.append([name, result])
        else:
            crops.append(result)
    crop_h, crop_w = plan["crop_size"]
    array = np.concatenate(crops) if crops else np.zeros((0, 3, crop_h, crop_w), np.uint8)
    array_path, receipt_path = _shard_paths(dst, shard)
    write_atomically(array_path, lambda file: np.save(file, array), force=True)
    receipt = {"file": array_path.name, "crops": len(array), "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
               "skipped": skipped}
    _write_json(receipt_path, receipt)
    return receipt


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _remove_store(dst: Path) -> None:
    """Remove the files a store consists of (nothing else in DST)."""
    for name in (INDEX_NAME, PLAN_NAME):
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / SHARD_DIR, ignore_errors=True)


def _crop_plan(src: Path, crop_size: PatchSize, stride: PatchSize | None, crops_per_image: int | None, seed: int,
               images_per_shard: int) -> dict[str, Any]:
    crop_hw = patch_hw(crop_size, "--crop-size")
    if stride is not None and crops_per_image is not None:
        raise DataError("--stride and --crops-per-image: choose one way to take crops")
    if crops_per_image is not None and crops_per_image < 1:
        raise DataError(f"--crops-per-image={crops_per_image}: must be at least 1")
    if images_per_shard < 1:
        raise DataError(f"--images-per-shard={images_per_shard}: must be at least 1")
    files = list_image_files(src)
    return {
        "format": STORE_FORMAT, "version": STORE_VERSION, "source_dir": os.fspath(src.resolve()),
        "sources": [path.relative_to(src).as_posix() for path in files], "crop_size": list(crop_hw),
        "stride": None if crops_per_image is not None else list(patch_hw(stride or crop_hw, "--stride")),
        "crops_per_image": crops_per_image, "seed": seed, "images_per_shard": images_per_shard,
    }


def prepare_store(src: str | os.PathLike, dst: str | os.PathLike, crop_size: PatchSize = 256,
                  stride: PatchSize | None = None, crops_per_image: int | None = None, seed: int = 0,
                  workers: int = 1, images_per_shard: int = 16, force: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Write the patch store of the images under ``src`` into ``dst``; returns its index.

    Crops are a grid with ``stride`` (default: the crop size, tiles that do not overlap) or
    ``crops_per_image`` seeded random places (from ``seed`` and the image's place in the
    sorted file list). The store depends only on the files and the options, not on
    ``workers``: its checksum (in the index) says so. Unreadable and too-small files are
    reported once each and left out. A non-empty ``dst`` is refused unless it holds an
    unfinished store of the same plan (which is then finished) or ``force`` is given (the
    old store's files are removed first).

    Raises:
        DataError: a bad option, ``src`` without images, ``dst`` in use, or no usable image.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    plan = _crop_plan(src, crop_size, stride, crops_per_image, seed, images_per_shard)
    if dst.exists() and not dst.is_dir():
        raise DataError(f"output {dst} is not a directory")
    if force:
        _remove_store(dst)
    elif dst.is_dir() and any(dst.iterdir()) and _read_json(dst / PLAN_NAME) != plan:
        raise DataError(f"output folder {dst} is not empty and holds no unfinished store of these inputs and "
                        "options (use --force to replace the store in it)")
    (dst / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(dst / PLAN_NAME, plan)

    shard_count = -(-len(plan["sources"]) // images_per_shard)
    pending = [shard for shard in range(shard_count) if not _shard_paths(dst, shard)[1].is_file()]
    if len(pending) < shard_count:
        logger.info("%s: %d of %d shards already written, %d to go", dst, shard_count - len(pending), shard_count,
                    len(pending))
    for receipt in _run_shards(dst, plan, pending, workers, progress):
        for name, reason in receipt["skipped"]:
            report_skipped(os.fspath(src / name), reason)

    receipts = [_read_json(_shard_paths(dst, shard)[1]) for shard in range(shard_count)]
    total = sum(receipt["crops"] for receipt in receipts)
    if total == 0:
        raise DataError(f"none of the {len(plan['sources'])} image files in {src} gives a crop (see the warnings)")
    index = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "crop_size": plan["crop_size"], "crops": total,
        "shards": [{key: receipt[key] for key in ("file", "crops", "sha256")} for receipt in receipts],
        "checksum": hashlib.sha256(json.dumps([plan["crop_size"], [r["sha256"] for r in receipts]]).encode())
        .hexdigest(),
        "skipped": [entry for receipt in receipts for entry in receipt["skipped"]],
    }
    _write_json(dst / INDEX_NAME, index)
    return index


def _run_shards(dst: Path, plan: dict[str, Any], shards: list[int], workers: int,
                progress: bool) -> Iterator[dict[str, Any]]:
    """Write ``shards`` (in worker processes when ``workers > 1``), yielding receipts in shard order."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if workers < 1:
        raise DataError(f"--workers={workers}: must be at least 1")
    per_shard = plan["images_per_shard"]
    images = [min(per_shard, len(plan["sources"]) - shard * per_shard) for shard in shards]
    with tqdm(total=sum(images), unit="image", disable=not progress) as bar, logging_redirect_tqdm():
        if workers == 1:
            receipts: Iterator[dict[str, Any]] = (_write_shard(dst, plan, shard) for shard in shards)
            for receipt, count in zip(receipts, images):
                bar.update(count)
                yield receipt
            return
        with ProcessPoolExecutor(workers) as pool:
            for receipt, count in zip(pool.map(_write_shard, [dst] * len(shards), [plan] * len(shards), shards),
                                      images):
                bar.update(count)
                yield receipt


class PatchStore:
    """The crops of a finished patch store: ``store[i]`` is crop ``i``, uint8 ``[3, H, W]`` (a view; do not write).

    Shards are memory-mapped when first read (and again in each process the store is sent
    to), so a store larger than memory costs only the crops that are read.

    Raises:
        DataError: ``path`` holds no finished store (the message says how to make one).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        index = _read_json(self.path / INDEX_NAME)
        if index is None:
            raise DataError(f"data.path={self.path}: no finished patch store ({INDEX_NAME} is missing); write it "
                            "with `streamlic prepare-data SRC DST`, or rerun that command to finish it")
        if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
            raise DataError(f"data.path={self.path}: {INDEX_NAME} is not a {STORE_FORMAT} v{STORE_VERSION} index")
        self.crop_size: tuple[int, int] = tuple(index["crop_size"])  # type: ignore[assignment]
        self.checksum: str = index["checksum"]
        self._files = [self.path / SHARD_DIR / shard["file"] for shard in index["shards"] if shard["crops"]]
        self._offsets = np.cumsum([0] + [shard["crops"] for shard in index["shards"] if shard["crops"]]).tolist()
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # memory maps are reopened, not pickled

    def _mapped(self) -> list[np.ndarray]:
        if self._arrays is None:
            # copy-on-write maps: torch takes them without a copy; nothing writes to them
            arrays = [np.load(file, mmap_mode="c") for file in self._files]
            for file, array, count in zip(self._files, arrays, np.diff(self._offsets)):
                if array.shape != (count, 3, *self.crop_size) or array.dtype != np.uint8:
                    raise DataError(f"patch store shard {file} does not match {INDEX_NAME}: {array.shape} "
                                    f"{array.dtype}; prepare the store again")
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"crop {index} out of range for a store of {len(self)}")
        shard = bisect.bisect_right(self._offsets, index) - 1
        return self._mapped()[shard][index - self._offsets[shard]]
