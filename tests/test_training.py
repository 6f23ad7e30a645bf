"""Staged training end to end: the real Trainer, configs composed by Hydra, a tiny model.

One five-stage run (module fixture) is shared by the tests that only read its outputs; the
others start their own runs, in process or as ``python train.py`` subprocesses.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from _training import (ROOT, TINY, checkpoint_file, compose_config, load_train_module, probe_overrides,
                       run_killed_mid_epoch, run_script, run_training, schedule, script_env, signal_mid_epoch)
from callbacks import STAGE_CHECKPOINT_NAMES, NonFiniteLossError, read_finished_stages, read_run_record
from streamlic.config import ConfigError
from streamlic.images import DataError
from streamlic.model import StreamLIC
from streamlic.stage import STAGES

FIVE_STAGES = schedule(aun=3, aun_lr=1e-3)  # stage 1 long enough to learn; one epoch for each later stage


pytestmark = pytest.mark.usefixtures("one_thread")  # as in the train.py subprocesses


_checkpoint = checkpoint_file


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in StreamLIC.checkpoint_state_dict(path).items() if isinstance(v, torch.Tensor)}


def _metrics_rows(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "csv" / "version_0" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def five_stage_run(tmp_path_factory):
    """All five stages with a tiny model: group lasso on, test set evaluated, model states probed."""
    out = tmp_path_factory.mktemp("five_stages")
    results = run_training(out, [*TINY, *FIVE_STAGES, "sparsity=lasso", "checkpoint.every_n_train_steps=4",
                                 *probe_overrides(out / "probe")])
    return out, results, torch.load(out / "probe" / "rank0.pt", weights_only=False)


@pytest.mark.slow
def test_five_stages_write_checkpoints_report_and_results(five_stage_run):
    out, results, _ = five_stage_run
    assert results["status"] == "finished" and results["stage"] == "pdf"
    for stage, name in STAGE_CHECKPOINT_NAMES.items():
        path = out / "checkpoints" / name
        assert path.is_file(), f"missing stage checkpoint {name}"
        state = _checkpoint(path)
        assert state["state_dict"]["model._extra_state"] is not None
        assert StreamLIC.from_checkpoint(path).stage == stage  # the stage travels in the checkpoint
        assert read_finished_stages(state)[-1] == stage
        assert "optimizer_states" not in state  # every stage starts with fresh optimizers: a stage checkpoint needs none
        assert read_run_record(state)["config"]["model"]["M"] == 24
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "optimizer_states" in _checkpoint(out / "checkpoints" / "last.ckpt")
    assert not list((out / "checkpoints").glob("epoch*.ckpt"))  # epoch checkpoints only on request

    report = json.loads((out / "stage_report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == list(STAGES)
    for row in report["stages"]:
        for when in ("start", "end"):
            assert {"bpp", "psnr", "ms_ssim", "loss"} <= set(row[when])
    aun = report["stages"][0]
    assert aun["end"]["loss"] < aun["start"]["loss"], "stage 1 did not lower the validation loss"
    assert [row["start_epoch"] for row in report["stages"]] == [0, 3, 4, 5, 6]

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["test"]["bpp"] > 0 and on_disk["test"]["psnr"] > 0
    assert set(on_disk["checkpoints"]) == set(STAGES)


@pytest.mark.slow
def test_metrics_are_logged_per_split_with_group_lasso_only_before_masks(five_stage_run):
    out, _, _ = five_stage_run
    rows = _metrics_rows(out)
    columns = set(rows[0])
    for split in ("train", "val", "test"):
        for metric in ("bpp", "psnr", "ms_ssim", "loss", "clamped_symbols"):
            assert any(c.startswith(f"{split}/{metric}") for c in columns), f"{split}/{metric} not logged"
    # MS-SSIM is measured on some training batches only, but on at least one of every epoch
    epochs = {r["epoch"] for r in rows if r.get("train/loss_epoch")}
    assert len(epochs) >= 5 and epochs == {r["epoch"] for r in rows if r.get("train/ms_ssim")}
    lasso_stages = {float(r["train/stage"]) for r in rows if r.get("train/group_lasso") and r.get("train/stage")}
    assert lasso_stages == {1.0}, "the group-lasso term must be trained in stage 1 only"
    lrs = {float(r["train/stage"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    # the schedule's rates, one per stage
    assert lrs == pytest.approx({1.0: 1e-3, 2.0: 1e-4, 3.0: 5e-5, 4.0: 2e-5, 5.0: 1e-3}, rel=1e-6)


@pytest.mark.slow
def test_frozen_stages_leave_other_parameters_untouched(five_stage_run):
    _, _, probe = five_stage_run
    starts = {stage: tensors for _, stage, tensors in probe["epochs"]}  # first epoch of each stage
    fix_start, pdf_start, (end_stage, end) = starts["fix_encoder"], starts["pdf"], probe["end"]
    assert end_stage == "pdf"

    def changed(before, after, prefix):
        return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]

    # stage 4: the encoder is frozen, the decoder still trains
    assert not changed(fix_start, pdf_start, "g_a.") and not changed(fix_start, pdf_start, "h_a.")
    assert changed(fix_start, pdf_start, "g_s.")
    # stage 5: only the probability tables train
    moved = {k for k in end if not torch.equal(pdf_start[k], end[k])}
    assert moved and all(k.startswith("rectified_cdf_") for k in moved), sorted(moved)


@pytest.mark.slow
def test_resume_with_ckpt_path_is_bit_identical(tmp_path):
    base = [*TINY, *schedule(aun=2), "test=false", "trainer.limit_train_batches=2"]  # 6 epochs
    straight = run_training(tmp_path / "straight", base)
    assert straight["status"] == "finished"
    # stop after epoch 2 (the end of stage 2), resume across the qat, fix_encoder and pdf transitions
    first = run_training(tmp_path / "resumed", [*base, "trainer.max_epochs=3"])
    assert first["stage"] == "mask"
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert _checkpoint(last)["global_step"] == 3 * 2
    # the first invocation stopped at max_epochs=3; a resume may lengthen the run (trainer.max_epochs is resumable)
    resumed = run_training(tmp_path / "resumed", [f"ckpt_path={last}", "trainer.max_epochs=6",
                                                  f"paths.output_dir={tmp_path / 'resumed'}"])
    assert resumed["stage"] == "pdf"
    assert [entry["ckpt_path"] for entry in resumed["invocations"]] == [None, str(last)]

    a = _checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = _checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6 * 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k, v in a["state_dict"].items()
                 if isinstance(v, torch.Tensor) and not torch.equal(v, b["state_dict"][k])]
    assert not different, f"resumed run differs in {different[:5]}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        assert opt_a["param_groups"] == opt_b["param_groups"]  # same groups and stage rate after a resume
        for index, state in opt_a["state"].items():
            assert all(torch.equal(v, opt_b["state"][index][k]) for k, v in state.items())
    # the stage report survives the resume, including the stages before it
    report = json.loads((tmp_path / "resumed" / "stage_report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == list(STAGES)


KILLED_RUN = [*TINY, *schedule(), "data.repeat=2", "test=false", "checkpoint.every_n_train_steps=1",
              "module.lmbda=0.05", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run with non-default overrides, SIGKILLed mid-epoch, and the same run left uninterrupted."""
    root = tmp_path_factory.mktemp("killed")
    steps_per_epoch = 5  # 10 crops, batch 2
    run_killed_mid_epoch(root / "run", KILLED_RUN, steps_per_epoch)
    straight = run_script([*KILLED_RUN, f"hydra.run.dir={root / 'straight'}"], timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    return root / "run", root / "straight", steps_per_epoch


def _differing_weights(a: Path, b: Path) -> list[str]:
    state_a, state_b = _model_state(a), _model_state(b)
    assert state_a.keys() == state_b.keys()
    return [k for k, v in state_a.items() if not torch.equal(v, state_b[k])]


@pytest.mark.slow
def test_sigkill_then_resume_with_ckpt_path_alone_is_the_same_run(killed_run):
    out, straight, steps_per_epoch = killed_run
    last = out / "checkpoints" / "last.ckpt"
    # a conflicting override is refused in one line that names the key, and nothing changes
    before = sorted(path.name for path in out.rglob("*"))
    refused = run_script([f"ckpt_path={last}", "module.lmbda=0.02"], timeout=120)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("ERROR ") and "module.lmbda" in refused.stderr
    assert sorted(path.name for path in out.rglob("*")) == before

    done = run_script([f"ckpt_path={last}"], timeout=300)  # nothing else: model, lambda, data come from the run
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["stage"] == "pdf"
    assert _checkpoint(last)["global_step"] == 5 * steps_per_epoch
    # the same config and the same weights as the uninterrupted run
    resumed_record = read_run_record(_checkpoint(last))
    straight_record = read_run_record(_checkpoint(straight / "checkpoints" / "last.ckpt"))
    assert resumed_record["config"]["module"]["lmbda"] == 0.05

    def run_config(record, run_dir):  # the config with this run's directory named alike
        return json.loads(json.dumps({**record["config"], "ckpt_path": None}).replace(str(run_dir), "RUN"))

    assert run_config(resumed_record, out) == run_config(straight_record, straight)
    different = _differing_weights(last, straight / "checkpoints" / "last.ckpt")
    assert not different, f"resumed run differs in {different[:5]}"
    # the record keeps both invocations: Hydra's original files and the resume's, and both in results.json
    assert "module.lmbda=0.05" in (out / ".hydra" / "overrides.yaml").read_text()
    assert f"ckpt_path={last}" in (out / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert [entry["ckpt_path"] for entry in results["invocations"]] == [None, str(last)]
    assert "module.lmbda=0.05" in results["invocations"][0]["overrides"]


@pytest.mark.slow
def test_sigint_stops_after_the_step_and_the_printed_command_resumes_the_same_run(killed_run, tmp_path):
    _, straight, steps_per_epoch = killed_run
    out = tmp_path / "run"
    proc, _ = signal_mid_epoch(out, KILLED_RUN, steps_per_epoch, signal.SIGINT)
    proc.wait(timeout=120)
    stderr = out.with_suffix(".stderr").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("INTERRUPTED")]
    assert len(lines) == 1, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stop = results["interrupted"]
    assert results["status"] == "interrupted" and stop["signal"] == "SIGINT"
    assert stop["step"] % steps_per_epoch and stop["stage"] == STAGES[stop["epoch"]]  # one epoch per stage here
    last = out / "checkpoints" / "last.ckpt"
    assert _checkpoint(last)["global_step"] == stop["step"]  # saved at the step it stopped after
    command = lines[0].split("resume with: ", 1)[1].split()
    assert command[0] == "python" and command[2:] == [f"ckpt_path={last}"]
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["status"] == "finished"
    different = _differing_weights(last, straight / "checkpoints" / "last.ckpt")
    assert not different, f"resumed run differs in {different[:5]}"
    # resuming the finished run says so and touches nothing
    written = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    again = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=script_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already trained" in again.stderr, again.stderr[-3000:]
    assert {path: mtime for path, mtime in written.items() if ".hydra" not in path.parts
            and path.suffix != ".log"} == {path: path.stat().st_mtime_ns for path in out.rglob("*")
                                          if path.is_file() and ".hydra" not in path.parts and path.suffix != ".log"}


@pytest.mark.slow
def test_resume_from_a_stage_checkpoint_alone_gives_the_uninterrupted_results(killed_run):
    _, straight, _ = killed_run
    stage2 = straight / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    uninterrupted = json.loads((straight / "results.json").read_text())
    refused = run_script([f"ckpt_path={stage2}", "module.lmbda=0.02"], timeout=120)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("ERROR ") and "module.lmbda (run: 0.05, now: 0.02)" in refused.stderr
    done = run_script([f"ckpt_path={stage2}"], timeout=300)  # resumes at stage 3 in the run's own directory
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((straight / "results.json").read_text())
    assert resumed["status"] == "finished"
    assert [row["stage"] for row in resumed["stage_report"]] == list(STAGES)
    for key in ("val", "stage_report", "context_macs_per_pixel"):
        assert resumed[key] == uninterrupted[key], key
    assert [entry["ckpt_path"] for entry in resumed["invocations"]] == [None, str(stage2)]


@pytest.mark.parametrize("overrides, error", [
    (["data=folder", "data.train_dir=/nonexistent"],
     "ERROR data.test_dir, data.val_dir: no value given; set them on the command line (data.test_dir=...)"),
    (["data=folder", "data.train_dir=/nonexistent", "data.val_dir=/nonexistent", "data.test_dir=/nonexistent"],
     "ERROR data folder /nonexistent does not exist or is not a directory"),
])
def test_bad_data_folder_is_one_error_line_and_leaves_nothing(tmp_path, overrides, error):
    done = run_script(overrides, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [error], done.stderr
    assert list(tmp_path.iterdir()) == [], "a run that never trained left files behind"


@pytest.mark.slow
def test_init_from_stage2_checkpoint_starts_at_stage3_without_recomputing(five_stage_run, tmp_path):
    source, _, _ = five_stage_run
    stage2 = source / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    saved = _model_state(stage2)
    results = run_training(tmp_path, [*TINY, *FIVE_STAGES, "sparsity=lasso", f"init_from={stage2}", "test=false",
                                      "trainer.max_epochs=5", *probe_overrides(tmp_path / "probe")])
    # the run starts at schedule epoch 4 (qat) and stops after it (max_epochs counts schedule epochs)
    assert results["stage"] == "qat"
    assert [(row["stage"], row["start_epoch"]) for row in results["stage_report"]] == [("qat", 4)]
    probe = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=False)
    epoch, stage, at_start = probe["epochs"][0]
    assert (epoch, stage, len(probe["epochs"])) == (0, "qat", 1)
    model = StreamLIC.from_checkpoint(stage2)
    for name, layer in model.sparse_layers().items():
        prefix = {"ctx1": "context_prediction.1", "ctx2": "context_prediction.3", "ep": "entropy_parameters.2"}[name]
        for buffer in ("mask", "in_mean", "in_sqmean"):
            assert torch.equal(at_start[f"{prefix}.{buffer}"], saved[f"{prefix}.{buffer}"]), f"{prefix}.{buffer}"
    # the scales frozen at the transition come from the checkpoint's ranges and weights, not from new data
    model.toggle_quantization(True)
    frozen = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for key in ("g_a.0.act_absmax", "g_a.0.weight_absmax", "g_a.0.req_m", "g_a.0.req_k", "h_s.0.req_m"):
        assert torch.equal(at_start[key], frozen[key]), key


def test_init_from_with_other_density_after_masks_is_a_config_error(tmp_path):
    model = StreamLIC(model={"c1": 12, "c2": 12, "c3": 24, "M": 24, "N": 12})
    model.set_all_mask()
    model.toggle_mask(True)
    path = tmp_path / "stage2.pt"
    torch.save(model.state_dict(), path)
    cfg = compose_config(tmp_path / "run", [*TINY, f"init_from={path}", "sparsity.density=0.5"])
    with pytest.raises(ConfigError, match=r"sparsity\.density=0\.5: init_from=.*masks, already cut"):
        load_train_module().train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_density_sweep_from_shared_aun_checkpoint_writes_summary(five_stage_run, tmp_path):
    source, _, _ = five_stage_run
    stage1 = source / "checkpoints" / STAGE_CHECKPOINT_NAMES["aun"]
    sweep = tmp_path / "sweep"
    done = run_script(["-m", *TINY, *FIVE_STAGES, "logger=wandb", "test=false", f"init_from={stage1}",
                       "sparsity.density=0.25,1.0", f"hydra.sweep.dir={sweep}"], timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == ["0", "1"]
    assert [row["overrides"].split()[-1] for row in rows] == ["sparsity.density=0.25", "sparsity.density=1.0"]
    assert all(row["status"] == "finished" and row["stage"] == "pdf" for row in rows)
    assert all(float(row["val_bpp"]) > 0 and float(row["val_psnr"]) > 0 for row in rows)
    sparse, dense = float(rows[0]["ctx_sparse_macs_per_px"]), float(rows[1]["ctx_sparse_macs_per_px"])
    assert sparse < dense == float(rows[1]["ctx_dense_macs_per_px"])
    assert "| job |" in (sweep / "summary.md").read_text()
    for job in ("0", "1"):  # one offline wandb run per job
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        report = json.loads((sweep / job / "stage_report.json").read_text())
        assert report["stages"][0]["stage"] == "mask"


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_masks_and_stage(tmp_path):
    out = tmp_path / "ddp"
    done = run_script([*TINY, *schedule(), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                       "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0", "test=false",
                       f"hydra.run.dir={out}", *probe_overrides(out / "probe")], timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    (stage0, end0), (stage1, end1) = ranks[0]["end"], ranks[1]["end"]
    assert stage0 == stage1 == "pdf"
    assert [s for _, s, _ in ranks[0]["epochs"]] == [s for _, s, _ in ranks[1]["epochs"]] == list(STAGES)
    masks = [k for k in end0 if k.endswith(".mask")]
    assert len(masks) == 3 and all(torch.equal(end0[k], end1[k]) for k in masks)
    differ = [k for k in end0 if not torch.equal(end0[k], end1[k])]
    assert not differ, f"ranks differ in {differ[:5]}"  # weights, statistics, scales and tables
    # at every epoch start too: the running statistics are reduced over the ranks in every step, so the
    # checkpoint rank 0 writes holds every rank's state
    for (epoch, _, state0), (_, _, state1) in zip(ranks[0]["epochs"], ranks[1]["epochs"]):
        differ = [k for k in state0 if not torch.equal(state0[k], state1[k])]
        assert not differ, f"epoch {epoch}: ranks differ in {differ[:5]}"
    # DDP leaves the frozen encoder alone in stage 4 (its gradients stay None on every rank)
    fix_start = next(t for _, s, t in ranks[0]["epochs"] if s == "fix_encoder")
    pdf_start = next(t for _, s, t in ranks[0]["epochs"] if s == "pdf")
    assert all(torch.equal(fix_start[k], pdf_start[k]) for k in fix_start if k.startswith(("g_a.", "h_a.")))
    assert any(not torch.equal(pdf_start[k], end0[k]) for k in end0 if k.startswith("rectified_cdf_"))
    assert (out / "checkpoints" / STAGE_CHECKPOINT_NAMES["pdf"]).is_file()
    assert json.loads((out / "results.json").read_text())["status"] == "finished"


def test_stage_aware_ddp_syncs_parameters_unfrozen_after_wrapping(tmp_path):
    """Plain DDP never all-reduces a parameter that was frozen when it wrapped the model (stage 5's tables)."""
    import socket

    import torch.multiprocessing as mp

    from _training import ddp_gradient_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the ranks reuse the imported modules instead of importing torch and Lightning again
    mp.start_processes(ddp_gradient_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for strategy, synced in (("plain", False), ("stage_aware", True)):
        first, second = ranks[0][strategy], ranks[1][strategy]
        assert torch.equal(first["always"], second["always"])
        assert torch.equal(first["later"], second["later"]) is synced, strategy


def _write_image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


@pytest.fixture
def data_folders(tmp_path: Path) -> dict[str, Path]:
    folders = {split: tmp_path / split for split in ("train", "val", "test")}
    for index in range(3):
        _write_image(folders["train"] / f"good{index}.png", 80, 96, seed=index)
    _write_image(folders["train"] / "nested" / "tiny.png", 20, 20, seed=9)
    corrupt = folders["train"] / "corrupt.png"
    _write_image(corrupt, 80, 80, seed=10)
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated
    (folders["train"] / "notes.png").write_text("not an image")
    _write_image(folders["val"] / "v.png", 64, 64, seed=11)
    _write_image(folders["test"] / "t.png", 50, 70, seed=12)  # odd size: padded for the model
    return folders


def _folder_overrides(folders: dict[str, Path]) -> list[str]:
    return ["data=folder", *[f"data.{split}_dir={path}" for split, path in folders.items()], "data.num_workers=0",
            "data.pin_memory=false", "data.crops_per_image=1"]


@pytest.mark.slow
def test_bad_files_in_data_folder_are_reported_and_skipped(data_folders, tmp_path, caplog):
    overrides = [*TINY, *_folder_overrides(data_folders), *schedule(), "trainer.max_epochs=1"]
    with caplog.at_level("WARNING", logger="streamlic.data"):
        results = run_training(tmp_path / "run", overrides)
    assert results["status"] == "finished" and results["test"]["psnr"] > 0
    skipped = " ".join(record.getMessage() for record in caplog.records)
    for name in ("tiny.png", "corrupt.png", "notes.png"):
        assert name in skipped, f"{name} was not reported"
    assert sum(record.getMessage().count("corrupt.png") for record in caplog.records) == 1  # reported once


def test_empty_data_folder_is_a_clear_error_before_training(data_folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [*TINY, *_folder_overrides({**data_folders, "train": empty}), *schedule()]
    with pytest.raises(DataError, match=r"empty.*holds no image files"):
        run_training(tmp_path / "run", overrides)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    overrides = [*TINY, *schedule(), "checkpoint.every_n_train_steps=1", "test=false",
                 "+callbacks.nan._target_=_training.NaNInjector", "+callbacks.nan.at_step=4"]
    results = run_training(tmp_path, overrides)
    assert results["status"] == "stopped: non-finite loss"
    assert "global step 4" in results["message"] and "last good checkpoint" in results["message"]
    last = _checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4  # nothing saved after the bad step
    floats = [v for v in last["state_dict"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in floats)


def test_non_finite_guard_raises_before_the_step():
    from callbacks import NonFiniteGuard

    class Trainer:
        optimizers = []
        current_epoch, global_step = 0, 7
        checkpoint_callbacks = []

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.ones(2))
    module.weight.grad = torch.tensor([1.0, float("inf")])
    optimizer = torch.optim.Adam(module.parameters())
    Trainer.optimizers = [optimizer]
    with pytest.raises(NonFiniteLossError, match=r"weight.*global step 7.*no checkpoint"):
        NonFiniteGuard().on_before_optimizer_step(Trainer(), module, optimizer)


def test_a_failed_invocation_into_an_existing_run_directory_keeps_its_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (run / "train.log").write_text("an earlier run's log\n")
    done = run_script(["data=folder", "data.train_dir=/nonexistent", f"hydra.run.dir={run}"], timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("ERROR ")
    assert (run / "results.json").read_text() == "{}"
    assert (run / "train.log").read_text().startswith("an earlier run's log")
