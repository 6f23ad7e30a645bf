"""The patch store: ``streamlic prepare-data`` on real files, ``data=patches`` training, resume and two ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _training import (ROOT, TINY, checkpoint_file, crop_key, run_killed_mid_epoch, run_script, schedule,
                       script_env)
from streamlic.data import ImageListDataset, PatchDataset, StreamLICDataModule
from streamlic.images import DEMO_SPLIT, DataError, demo_images
from streamlic.model import StreamLIC
from streamlic.patches import PatchStore, prepare_store
from test_data import _photo_like, _write_rgb

CROP = 32


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Three good images in a tree, a truncated PNG, a text file named .jpg and a too-small image."""
    root = tmp_path / "src"
    _write_rgb(root / "a.png", 80, 96, seed=1)
    _write_rgb(root / "sub" / "b.jpg", 70, 70, seed=2)
    _write_rgb(root / "sub" / "deeper" / "c.png", 64, 100, seed=3)
    truncated = _write_rgb(root / "sub" / "truncated.png", 80, 80, seed=4)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    _write_rgb(root / "tiny.png", 16, 16)
    return root


def _prepare_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlic.cli", "prepare-data", *map(str, args)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=300)


def _pil_grid_crops(path: Path, size: int, stride: int) -> list[np.ndarray]:
    """An independent reader: Pillow's RGB pixels, crops on the grid, as [3, h, w]."""
    pixels = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    height, width = pixels.shape[1:]
    return [pixels[:, top : top + size, left : left + size] for top in range(0, height - size + 1, stride)
            for left in range(0, width - size + 1, stride)]


def test_prepare_data_skips_each_bad_file_in_one_line_and_stores_the_crops_pillow_sees(source, tmp_path):
    done = _prepare_cli(source, tmp_path / "store", "--crop-size", CROP, "--stride", 24, "--images-per-shard", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert sorted(warnings) == sorted(f"WARNING skipping {source / name}: {reason}" for name, reason in [
        ("sub/truncated.png", "unreadable or truncated image (image file is truncated)"),
        ("text.jpg", f"unreadable or truncated image (cannot identify image file '{source / 'text.jpg'}')"),
        ("tiny.png", f"image is 16x16, smaller than the crop {CROP}x{CROP}")]), done.stderr
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["checksum"] in done.stdout and len(index["skipped"]) == 3

    store = PatchStore(tmp_path / "store")
    expected = [crop for name in ("a.png", "sub/b.jpg", "sub/deeper/c.png")
                for crop in _pil_grid_crops(source / name, CROP, 24)]
    assert len(store) == len(expected) == 3 * 3 + 2 * 2 + 2 * 3
    assert all(np.array_equal(store[i], crop) for i, crop in enumerate(expected))
    # training crops are the stored crops, some of them mirrored, and batches hold load_image's values
    dataset = PatchDataset(store, CROP, seed=7)
    crops = [dataset[(3, index)] for index in range(len(store))]
    for crop, stored in zip(crops, expected):
        stored = torch.from_numpy(np.ascontiguousarray(stored))
        assert torch.equal(crop, stored) or torch.equal(crop, stored.flip(-1))
    assert all(torch.equal(crop, dataset[(3, index)]) for index, crop in enumerate(crops))
    assert torch.equal(dataset.collate(crops[:2]),
                       torch.stack([torch.from_numpy(crop.numpy() / 255.0).float() for crop in crops[:2]]))


def test_prepare_is_deterministic_resumes_and_refuses_a_used_folder(source, tmp_path):
    options = {"crop_size": CROP, "crops_per_image": 3, "seed": 5, "images_per_shard": 2, "progress": False}
    first = prepare_store(source, tmp_path / "one", **options)
    assert prepare_store(source, tmp_path / "two", workers=2, **options)["checksum"] == first["checksum"]
    assert first["crops"] == 3 * 3
    assert prepare_store(source, tmp_path / "seed6", **{**options, "seed": 6})["checksum"] != first["checksum"]

    # an interrupted store: no index, the last shard missing, a half-written temporary file
    store = tmp_path / "one"
    (store / "index.json").unlink()
    for path in (store / "shards").glob("00002.*"):
        path.unlink()
    (store / "shards" / ".00002.npy.tmp").write_bytes(b"partial")
    kept = {path.name: path.stat().st_mtime_ns for path in (store / "shards").glob("0000[01].*")}
    with pytest.raises(DataError, match="no finished patch store"):
        PatchStore(store)
    done = _prepare_cli(source, store, "--crop-size", CROP, "--crops-per-image", 3, "--seed", 5,
                        "--images-per-shard", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of 3 shards already written, 1 to go" in done.stderr
    assert json.loads((store / "index.json").read_text())["checksum"] == first["checksum"]
    assert {path.name: path.stat().st_mtime_ns for path in (store / "shards").glob("0000[01].*")} == kept

    # other options on an existing store, or a folder of other files: refused in one line, nothing touched
    for args in (["--crop-size", 16], []):
        refused = _prepare_cli(source, tmp_path / "two", *args)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"ERROR output folder {tmp_path / 'two'} is not empty and holds no unfinished store of these inputs "
            "and options (use --force to replace the store in it)"]
    assert json.loads((tmp_path / "two" / "index.json").read_text())["checksum"] == first["checksum"]
    forced = _prepare_cli(source, tmp_path / "two", "--crop-size", 16, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert PatchStore(tmp_path / "two").crop_size == (16, 16)


def test_crops_per_image_cuts_several_seeded_crops_from_one_decode(tmp_path):
    path = _write_rgb(tmp_path / "x.png", 60, 70, seed=3)
    pixels = torch.from_numpy(_photo_like(60, 70, seed=3) / 255.0).float().permute(2, 0, 1)
    dataset = ImageListDataset([path], "train", 24, repeat=8, seed=1, crops_per_image=4)
    assert len(dataset) == 2
    crops = dataset[(2, 1)]
    assert crops.shape == (4, 3, 24, 24) and torch.equal(crops, dataset[(2, 1)])
    assert not torch.equal(crops, dataset[(3, 1)])
    windows = pixels.unfold(1, 24, 1).unfold(2, 24, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 24, 24)
    for crop in crops:
        assert (windows == crop).flatten(1).all(1).any() or (windows == crop.flip(-1)).flatten(1).all(1).any()
    # the first crop of an item is the single crop of crops_per_image=1: the seed rule is unchanged
    single = ImageListDataset([path], "train", 24, repeat=8, seed=1)
    assert torch.equal(crops[0], single[(2, 1)])
    with pytest.raises(DataError, match="crops_per_image=3"):
        ImageListDataset([path], "train", 24, repeat=8, seed=1, crops_per_image=3)

    datamodule = StreamLICDataModule(source="folder", train_dir=tmp_path, val_dir=tmp_path, patch_size=24,
                                     batch_size=4, repeat=8, crops_per_image=2, seed=1)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert [batch.shape for batch in batches] == [(4, 3, 24, 24)] * 2


# --- training from the store: resume and two ranks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """12 crops of 64 px from the demo training photos (6 steps of 2, or 3 per rank on two ranks)."""
    root = tmp_path_factory.mktemp("demo_store")
    for name, image in demo_images("train"):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / f"{name}.png")
    (root / "astronaut.png").unlink()  # 4 photos of 3 crops
    prepare_store(root, root / "store", crop_size=64, crops_per_image=3, progress=False)
    assert len(PatchStore(root / "store")) == 12 and len(DEMO_SPLIT["train"]) == 5
    return root / "store"


def _patch_run(store: Path) -> list[str]:
    return [*[o for o in TINY if not o.startswith("data.repeat")], "data=patches", f"data.path={store}",
            "data.num_workers=0", "data.pin_memory=false", *schedule(), "test=false",
            "checkpoint.every_n_train_steps=1", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def _same_weights(a: Path, b: Path) -> None:
    left, right = (StreamLIC.checkpoint_state_dict(path) for path in (a, b))
    different = [k for k, v in left.items() if isinstance(v, torch.Tensor) and not torch.equal(v, right[k])]
    assert not different, f"resumed run differs in {different[:5]}"


@pytest.mark.slow
def test_patches_sigkill_then_resume_with_ckpt_path_alone_is_the_same_run(demo_store, tmp_path):
    run = _patch_run(demo_store)
    run_killed_mid_epoch(tmp_path / "run", run, steps_per_epoch=6)
    resumed = run_script([f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_script([*run, f"hydra.run.dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    last = [tmp_path / name / "checkpoints" / "last.ckpt" for name in ("run", "straight")]
    assert checkpoint_file(last[0])["global_step"] == checkpoint_file(last[1])["global_step"] == 5 * 6
    _same_weights(*last)


@pytest.mark.slow
def test_patches_two_ranks_share_out_the_store_and_resume_exactly(demo_store, tmp_path):
    run = [*_patch_run(demo_store), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]

    def probe(name: str) -> list[str]:
        return ["+callbacks.batches._target_=_training.BatchProbe", f"+callbacks.batches.out_dir={tmp_path / name}"]

    def batches(name: str) -> list[list[tuple[int, list[bytes]]]]:
        return [torch.load(tmp_path / name / f"rank{rank}-batches.pt") for rank in (0, 1)]

    straight = run_script([*run, *probe("probe"), f"hydra.run.dir={tmp_path / 'straight'}"], timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    store = PatchStore(demo_store)
    everything = sorted(crop_key(PatchDataset.collate([torch.from_numpy(store[i])])[0]) for i in range(len(store)))
    ranks = batches("probe")
    seen_by_epoch = []
    for epoch in range(5):
        seen = [[key for e, keys in rank if e == epoch for key in keys] for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])  # disjoint halves
        assert sorted(seen[0] + seen[1]) == everything  # the whole store once
        seen_by_epoch.append(seen[0])
    assert seen_by_epoch[0] != seen_by_epoch[1]  # reshuffled every epoch

    # killed in stage 1, while every rank gathers the running statistics that rank 0's checkpoint must
    # carry for both, resumed, killed again in the last epoch and resumed
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_killed_mid_epoch(tmp_path / "run", [*run, *probe("probe-resumed")], steps_per_epoch=3, timeout=500,
                         after_epochs=0)
    run_killed_mid_epoch(tmp_path / "run", [f"ckpt_path={last}"], steps_per_epoch=3, timeout=500, after_epochs=4)
    resumed = run_script([f"ckpt_path={last}"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for after_resume, whole_run in zip(batches("probe-resumed"), ranks):  # each rank continues its own share
        assert 0 < len(after_resume) < 3 and after_resume == whole_run[-len(after_resume):]
    _same_weights(*(tmp_path / name / "checkpoints" / "last.ckpt" for name in ("run", "straight")))
