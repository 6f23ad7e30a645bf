"""Training crops per second per core: image folders (PNG, JPEG), crops_per_image, the patch store.

Makes 2040x1356 files (the size of DIV2K photos) by resizing the demo training photos, as PNG
and as JPEG quality 95, into a temporary folder; writes a patch store of the PNGs with
``streamlic prepare-data``'s code; then, in one process and one after the other:

1. loader rate: seeded training crops through a DataLoader (workers 0, so one core does all
   the work) from the PNG folder, the JPEG folder, both with several ``crops_per_image``,
   and the store; LitData's ``StreamingDataset`` on the same crops when ``litdata`` imports;
2. end to end: the tiny model's stage-1 training steps through Lightning (loader workers 0)
   from the PNG folder and from the store.

    OMP_NUM_THREADS=1 python bench/loader.py [--files 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from streamlic.data import EpochSeededSampler, ImageListDataset, PatchDataset
from streamlic.images import DEMO_SPLIT, demo_images
from streamlic.patches import PatchStore, prepare_store
from train_throughput import ROOT, ThroughputTimer, load_train_script

SIZE = (2040, 1356)  # width, height
CROP = 256


def make_files(folder: Path, count: int) -> dict[str, Path]:
    """``count`` demo photos resized to 2040x1356 (bicubic), as PNG and as JPEG q95."""
    dirs = {kind: folder / kind for kind in ("png", "jpeg")}
    for path in dirs.values():
        path.mkdir()
    photos = demo_images("train") + demo_images("val") + demo_images("test")
    for index in range(count):
        name, image = photos[index % len(photos)]
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        big = Image.fromarray(pixels).resize(SIZE, Image.Resampling.BICUBIC)
        big.save(dirs["png"] / f"{index:02d}-{name}.png")
        big.save(dirs["jpeg"] / f"{index:02d}-{name}.jpg", quality=95)
    return dirs


def loader_rate(dataset, crops: int, batch_size: int = 16, crops_per_item: int = 1) -> float:
    """Crops per second of one pass of seeded batches until ``crops`` crops (workers 0)."""
    loader = DataLoader(dataset, batch_size=batch_size // crops_per_item, sampler=EpochSeededSampler(len(dataset), 1),
                        collate_fn=dataset.collate)
    done, start = 0, time.perf_counter()
    while done < crops:
        for batch in loader:
            done += batch.shape[0]
            if done >= crops:
                break
    return done / (time.perf_counter() - start)


def indexed_rate(read, length: int, crops: int) -> float:
    """Crops per second of ``read(i)`` (a uint8 crop) to a float tensor, in a seeded random order."""
    order = np.random.default_rng(1).permutation(length)
    done, start = 0, time.perf_counter()
    while done < crops:
        for index in order[: crops - done]:
            torch.from_numpy(np.array(read(int(index)))).float().div_(255)
            done += 1
    return done / (time.perf_counter() - start)


def litdata_rate(store: PatchStore, folder: Path, crops: int) -> float | None:
    """:func:`indexed_rate` of LitData's StreamingDataset holding the store's crops (None without litdata)."""
    try:
        from litdata import StreamingDataset, optimize
    except ImportError:
        return None
    optimize(fn=_store_item, inputs=[(str(store.path), index) for index in range(len(store))],
             output_dir=str(folder), chunk_bytes="64MB", num_workers=1)
    dataset = StreamingDataset(str(folder))
    return indexed_rate(lambda index: dataset[index]["crop"], len(dataset), crops)


def _store_item(key: tuple[str, int]) -> dict[str, np.ndarray]:
    path, index = key
    return {"crop": np.array(PatchStore(path)[index])}


def training_rate(train, cfg, steps: int, warmup: int, accelerator: str = "cpu") -> float:
    """Images per second of stage-1 training steps of ``cfg`` through Lightning, data loading included."""
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _partial_=True)(model=train.build_model(cfg))
    timer = ThroughputTimer(warmup)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=1, limit_train_batches=warmup + steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    if timer.end is None:
        sys.exit(f"ERROR the epoch has fewer than {warmup + steps} batches: give more --files or fewer --steps")
    return timer.images / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=len(DEMO_SPLIT["train"]), help="2040x1356 files of each kind")
    parser.add_argument("--folder-crops", type=int, default=32, help="crops timed per folder row")
    parser.add_argument("--store-crops", type=int, default=4000, help="crops timed per store row")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch of the end-to-end rows")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps (after 2 untimed)")
    parser.add_argument("--accelerator", default="cpu", help="of the end-to-end rows: cpu, or gpu (the loader "
                                                               "stays on the CPU, so the ratio there is the loader's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("litdata").setLevel(logging.ERROR)
    rows: list[tuple[str, float]] = []

    def add(row: tuple[str, float]) -> None:
        rows.append(row)
        print(f"{row[0]:<52} {row[1]:10.1f} crops/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_files(Path(tmp), args.files)
        store_dir = Path(tmp) / "store"
        index = prepare_store(dirs["png"], store_dir, crop_size=CROP, stride=CROP // 2, progress=False)
        store = PatchStore(store_dir)
        print(f"{args.files} files of {SIZE[0]}x{SIZE[1]} per kind; store: {index['crops']} crops of {CROP}x{CROP}")

        for kind in ("png", "jpeg"):
            files = sorted(dirs[kind].iterdir())
            for per_image in (1, 4, 8, 16):
                dataset = ImageListDataset(files, "train", CROP, repeat=16, seed=1, crops_per_image=per_image)
                crops = args.folder_crops if per_image == 1 else 4 * args.folder_crops
                add((f"folder {kind}, crops_per_image={per_image}",
                     loader_rate(dataset, crops, crops_per_item=per_image)))
        add(("patch store (npy memmap), data=patches", loader_rate(PatchDataset(store, CROP, seed=1),
                                                                    args.store_crops)))
        add(("patch store, store[i] to float (no crop, flip, batch)",
             indexed_rate(store.__getitem__, len(store), args.store_crops)))
        litdata = litdata_rate(store, Path(tmp) / "litdata", args.store_crops)
        if litdata is not None:
            add(("LitData StreamingDataset[i] to float, same crops", litdata))

        train = load_train_script()
        common = ["model=tiny", f"data.patch_size={CROP}", f"data.batch_size={args.batch_size}",
                  "data.num_workers=0", "data.pin_memory=false", f"data.val_dir={dirs['png']}",
                  f"data.test_dir={dirs['png']}", "paths.output_dir=."]
        folder = ["data=folder", f"data.train_dir={dirs['png']}", "data.repeat=16"]
        sources = {"folder png": [*folder, "data.crops_per_image=1"],
                   "folder png, crops_per_image=4": [*folder, "data.crops_per_image=4"],
                   "patch store": ["data=patches", f"data.path={store_dir}"]}
        training = {}
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for name, overrides in sources.items():
                cfg = compose("config", overrides=[*overrides, *common])
                training[name] = training_rate(train, cfg, args.steps, warmup=2, accelerator=args.accelerator)
                print(f"tiny model training from {name:<30} {training[name]:10.2f} images/s")

    png = rows[0][1]
    print(f"\nloader, one core (OMP_NUM_THREADS={torch.get_num_threads()}), {CROP}x{CROP} crops, batch 16:")
    print(f"{'source':<52} {'crops/s':>10} {'x PNG':>8}")
    for name, rate in rows:
        print(f"{name:<52} {rate:10.1f} {rate / png:8.1f}")
    print(f"\nend to end on {args.accelerator}, tiny model, batch {args.batch_size}, {CROP}x{CROP}, loader workers 0:")
    print(f"{'training data':<52} {'images/s':>10} {'store is':>10}")
    for name, rate in training.items():
        print(f"{name:<52} {rate:10.2f} {training['patch store'] / rate:9.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"loader_crops_per_s": dict(rows), "training_images_per_s": training},
                                        indent=2))


if __name__ == "__main__":
    main()
