"""Tests of streamlic.data on real image files written with Pillow."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from streamlic.data import EpochSeededSampler, ImageListDataset, StreamLICDataModule
from streamlic.images import DEMO_SPLIT, DataError, ImageReadError, demo_images, load_image, scan_folder


def _photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random-looking RGB content (uint8), so crops at different places differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], axis=-1)
    noise = rng.normal(0, 0.1, (height, width, 3))
    return np.clip((base + noise + 1.0) * 127.5, 0, 255).astype(np.uint8)


def _write_rgb(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo_like(height, width, seed)).save(path)
    return path


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A folder tree with good images and every kind of bad file scan_folder must skip."""
    root = tmp_path / "data"
    _write_rgb(root / "a.png", 80, 96, seed=1)
    _write_rgb(root / "sub" / "b.JPG", 70, 70, seed=2)
    _write_rgb(root / "sub" / "deeper" / "c.webp", 64, 100, seed=3)
    _write_rgb(root / "tiny.png", 16, 16)
    truncated = _write_rgb(root / "sub" / "truncated.png", 80, 80, seed=4)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return root


# --- load_image: the conversion rule -------------------------------------------------


def test_load_rgb_png_is_exact_division_by_255(tmp_path: Path) -> None:
    pixels = _photo_like(20, 30)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    assert image.dtype == torch.float32 and image.shape == (3, 20, 30)
    expected = torch.from_numpy((pixels / 255.0).astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(image, expected)


def test_16_bit_grey_is_scaled_by_65535_not_truncated(tmp_path: Path) -> None:
    values = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as reopened:
        assert reopened.mode.startswith("I")  # really a 16-bit file
    image = load_image(tmp_path / "deep.png")
    assert image.shape == (3, 1, 4)
    assert image[0, 0, 3].item() == 1.0
    assert image[0, 0, 2].item() == pytest.approx(32768 / 65535, abs=1e-7)
    assert image[0, 0, 1].item() == pytest.approx(1 / 65535, abs=1e-9)  # 8-bit would lose it
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_grey_is_replicated_to_three_channels(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    for channel in range(3):
        assert torch.equal(image[channel], torch.from_numpy(grey / 255.0).float())


def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 51]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert torch.equal(image[:, 0, 0], torch.ones(3))  # transparent -> white
    assert torch.equal(image[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # opaque -> itself
    assert torch.allclose(image[:, 0, 2], torch.full((3,), 1 - 51 / 255))  # black at 20 %


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 255, 10, 20, 30] + [0] * 762)
    palette_image.putdata([0, 1])
    palette_image.save(tmp_path / "p.png", transparency=0)
    image = load_image(tmp_path / "p.png")
    assert torch.equal(image[:, 0, 0], torch.ones(3))
    assert torch.allclose(image[:, 0, 1], torch.tensor([10, 20, 30]) / 255.0)


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_unreadable_files_raise_image_read_error_naming_the_file(tmp_path: Path, content: str) -> None:
    path = _write_rgb(tmp_path / "bad.png", 64, 64)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(path)
    assert issubclass(ImageReadError, ValueError)


# --- scan_folder -------------------------------------------------------------------------


def test_scan_folder_recursive_sorted_and_skips_bad_files_once(messy_folder: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="streamlic.data"):
        files = scan_folder(messy_folder, min_size=32)
    assert [path.relative_to(messy_folder).as_posix() for path in files] == [
        "a.png",
        "sub/b.JPG",
        "sub/deeper/c.webp",
    ]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 3
    for bad_name in ("tiny.png", "truncated.png", "notes.png"):
        assert sum(bad_name in message for message in warnings) == 1
    assert any("16x16" in message for message in warnings)


def test_scan_folder_min_size_default_keeps_tiny_images(messy_folder: Path) -> None:
    assert "tiny.png" in [path.name for path in scan_folder(messy_folder)]


def test_scan_folder_missing_empty_or_all_bad_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=str(empty)):
        scan_folder(empty)
    only_small = tmp_path / "small"
    _write_rgb(only_small / "s.png", 16, 16)
    with pytest.raises(DataError, match=str(only_small)):
        scan_folder(only_small, min_size=64)


# --- demo images ---------------------------------------------------------------------------


def test_demo_split_sizes_disjoint_and_real_photos() -> None:
    assert {split: len(names) for split, names in DEMO_SPLIT.items()} == {"train": 5, "val": 2, "test": 2}
    all_names = [name for names in DEMO_SPLIT.values() for name in names]
    assert len(set(all_names)) == len(all_names)
    images = demo_images()
    assert [name for name, _ in images] == [Path(name).stem for name in all_names]
    for name, image in images:
        assert image.dtype == torch.float32 and image.shape[0] == 3, name
        assert min(image.shape[1:]) >= 256, name
        assert 0.0 <= image.min() and image.max() <= 1.0, name
        assert image.std() > 0.05, name  # real content, not a flat placeholder
        assert not torch.equal(image[0], image[1]), name  # colour
    assert [name for name, _ in demo_images("val")] == [Path(name).stem for name in DEMO_SPLIT["val"]]
    with pytest.raises(DataError):
        demo_images("holdout")  # type: ignore[arg-type]


# --- ImageListDataset ----------------------------------------------------------------------


def test_dataset_modes_shapes_and_small_image_skipping(caplog) -> None:
    big = torch.rand(3, 50, 70)
    small = torch.rand(3, 20, 70)
    with caplog.at_level(logging.WARNING, logger="streamlic.data"):
        train = ImageListDataset([big, small], "train", patch_size=(32, 48), repeat=3, names=["big", "small"])
    assert train.names == ["big"] and len(train) == 3
    with pytest.raises(IndexError):
        train[3]
    assert sum("small" in record.getMessage() for record in caplog.records) == 1
    for index in range(len(train)):
        assert train[index].shape == (3, 32, 48)

    val = ImageListDataset([big], "val", patch_size=32)
    assert torch.equal(val[0], big[:, 9:41, 19:51])
    test = ImageListDataset([big, small], "test")
    assert torch.equal(test[1], small)
    with pytest.raises(DataError):
        ImageListDataset([small], "val", patch_size=32)


def test_dataset_reads_files_and_seeded_crops_depend_on_epoch_and_index(tmp_path: Path) -> None:
    path = _write_rgb(tmp_path / "p.png", 64, 64)
    full = load_image(path)
    dataset = ImageListDataset([path], "train", patch_size=24, repeat=4, seed=7)
    again = ImageListDataset([path], "train", patch_size=24, repeat=4, seed=7)
    keys = [(epoch, index) for epoch in range(2) for index in range(4)]
    crops = [dataset[key] for key in keys]
    assert all(torch.equal(crop, again[key]) for crop, key in zip(crops, keys))
    assert torch.equal(dataset[0], dataset[(0, 0)])
    assert len({tuple(crop.flatten()[:8].tolist()) for crop in crops}) > 4  # crops vary
    # Every crop is a (possibly flipped) window of the image.
    windows = full.unfold(1, 24, 1).unfold(2, 24, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 24, 24)
    for crop in crops:
        found = (windows == crop).flatten(1).all(1).any() or (windows == crop.flip(-1)).flatten(1).all(1).any()
        assert found


def test_epoch_seeded_sampler_is_a_per_epoch_permutation() -> None:
    sampler = EpochSeededSampler(10, seed=3)
    first = list(sampler)
    assert sorted(index for _, index in first) == list(range(10)) and {e for e, _ in first} == {0}
    assert list(EpochSeededSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in second} == {1} and [i for _, i in second] != [i for _, i in first]


# --- StreamLICDataModule -------------------------------------------------------------------


def test_demo_datamodule_batches() -> None:
    datamodule = StreamLICDataModule(source="demo", patch_size=128, batch_size=4, repeat=2)
    datamodule.setup("fit")
    train_batch = next(iter(datamodule.train_dataloader()))
    assert train_batch.shape == (4, 3, 128, 128) and train_batch.dtype == torch.float32
    assert 0.0 <= train_batch.min() and train_batch.max() <= 1.0
    assert len(datamodule.train_dataset) == 10
    val_batches = list(datamodule.val_dataloader())
    assert [batch.shape for batch in val_batches] == [(2, 3, 128, 128)]
    datamodule.setup("test")
    test_shapes = [batch.shape for batch in datamodule.test_dataloader()]
    assert test_shapes == [(1, 3, 300, 451), (1, 3, 427, 640)]


def test_folder_datamodule_reports_each_bad_file_once(messy_folder: Path, tmp_path: Path, caplog) -> None:
    val_dir = tmp_path / "val"
    _write_rgb(val_dir / "v.png", 40, 40)
    _write_rgb(val_dir / "v_small.png", 20, 40)
    datamodule = StreamLICDataModule(
        source="folder", train_dir=messy_folder, val_dir=val_dir, test_dir=val_dir, patch_size=32, batch_size=2
    )
    with caplog.at_level(logging.WARNING, logger="streamlic.data"):
        datamodule.setup("fit")
        for _epoch in range(2):
            for batch in datamodule.train_dataloader():
                assert batch.shape[1:] == (3, 32, 32)
        datamodule.setup("fit")  # a second fit must not rescan
        datamodule.setup("test")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 4  # tiny, truncated, notes (train) and v_small (val); test keeps v_small
    assert len(datamodule.train_dataset) == 3 and len(datamodule.val_dataset) == 1
    assert [batch.shape for batch in datamodule.test_dataloader()] == [(1, 3, 40, 40), (1, 3, 20, 40)]


def test_folder_datamodule_needs_its_dirs(tmp_path: Path) -> None:
    datamodule = StreamLICDataModule(source="folder", val_dir=tmp_path, patch_size=32)
    with pytest.raises(DataError, match="train_dir"):
        datamodule.setup("fit")
    with pytest.raises(DataError, match="source"):
        StreamLICDataModule(source="imagenet")  # type: ignore[arg-type]


def _first_batches(datamodule: StreamLICDataModule, count: int) -> list[torch.Tensor]:
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def test_crops_reproducible_with_seed_everything() -> None:
    def run() -> list[torch.Tensor]:
        L.seed_everything(123, workers=True)
        return _first_batches(StreamLICDataModule(source="demo", patch_size=64, batch_size=4, repeat=2), 2)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    L.seed_everything(124, workers=True)
    other = _first_batches(StreamLICDataModule(source="demo", patch_size=64, batch_size=4, repeat=2), 1)
    assert not torch.equal(first[0], other[0])


def test_seeded_datamodule_ignores_global_randomness() -> None:
    def run(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        return _first_batches(StreamLICDataModule(source="demo", patch_size=64, batch_size=4, seed=5), 2)

    assert all(torch.equal(a, b) for a, b in zip(run(0), run(1)))


def test_hydra_configs_instantiate(messy_folder: Path, tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf_dir = Path(__file__).resolve().parents[1] / "conf" / "data"
    demo = instantiate(OmegaConf.load(conf_dir / "demo.yaml"))
    assert isinstance(demo, StreamLICDataModule)
    assert demo.patch_size == (128, 128) and demo.batch_size == 4 and demo.repeat == 8

    folder_conf = OmegaConf.load(conf_dir / "folder.yaml")
    assert OmegaConf.is_missing(folder_conf, "train_dir")
    for key in ("train_dir", "val_dir", "test_dir"):
        folder_conf[key] = str(messy_folder)
    folder_conf.patch_size = [32, 48]
    folder = instantiate(folder_conf)
    assert folder.patch_size == (32, 48) and folder.val_patch_size == (32, 48) and folder.batch_size == 8


def test_auto_workers_follow_the_machine_and_bad_values_name_the_key():
    import os

    from streamlic.data import loader_workers

    assert loader_workers("auto") == min(8, max(0, (os.cpu_count() or 1) - 1))
    assert loader_workers(3) == 3
    with pytest.raises(DataError, match=r"data.num_workers='many'"):
        loader_workers("many")
