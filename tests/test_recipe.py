"""The training recipe: learning-rate schedules within stages, CompressAI quality levels, stage report deltas."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from _training import TINY, compose_config, load_train_module, run_training, schedule
from callbacks import LRSchedule
from streamlic.config import ConfigError
from streamlic.lightning_module import COMPRESSAI_LAMBDAS, quality_lambda

SHORT = [*TINY, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # as in the train.py subprocesses


def _logged_rates(output_dir: Path) -> list[tuple[int, float, float]]:
    """(step, stage, lr) of every logged training step."""
    with open(output_dir / "csv" / "version_0" / "metrics.csv") as handle:
        return [(int(row["step"]), float(row["train/stage"]), float(row["train/lr"]))
                for row in csv.DictReader(handle) if row.get("train/lr")]


@pytest.mark.slow
def test_cosine_within_each_stage_and_quality_level(tmp_path):
    results = run_training(tmp_path, [*SHORT, *schedule(aun=2), "schedule.lr_schedule.name=cosine",
                                      "schedule.lr_schedule.final_factor=0.1", "module.quality=3"])
    assert results["status"] == "finished"
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "lmbda: 0.0067" in hparams  # CompressAI's MSE quality 3
    rates = _logged_rates(tmp_path)
    stage_lr = {1: 3e-4, 2: 1e-4, 3: 5e-5, 4: 2e-5, 5: 1e-3}
    # 2 steps per epoch: stage 1 has 4 steps, the others 2; a half cosine from lr down to 0.1 lr
    expected = []
    for stage, steps in zip(range(1, 6), (4, 2, 2, 2, 2)):
        expected += [(stage, stage_lr[stage] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / (steps - 1)))))
                     for i in range(steps)]
    assert [(stage, lr) for _, stage, lr in rates] == [(s, pytest.approx(lr, rel=1e-6)) for s, lr in expected]

    report = json.loads((tmp_path / "stage_report.json").read_text())["stages"]
    assert "transition" not in report[0]
    for previous, row in zip(report, report[1:]):
        for metric in ("bpp", "psnr", "loss"):
            assert row["transition"][metric] == pytest.approx(row["start"][metric] - previous["end"][metric])
            assert row["recovery"][metric] == pytest.approx(row["end"][metric] - row["start"][metric])
        assert row["start"]["clamped_symbols"] >= 0


def _plateau_run(tmp_path: Path, name: str, extra: list[str]) -> dict:
    # threshold 0.99: no epoch after the first counts as progress, so with patience 0 the rate halves every epoch
    return run_training(tmp_path / name, [*SHORT, *schedule(aun=4), "schedule.lr_schedule.name=plateau",
                                          "schedule.lr_schedule.patience=0", "schedule.lr_schedule.threshold=0.99",
                                          *extra])


@pytest.mark.slow
def test_plateau_halves_the_rate_and_resumes_bit_identically(tmp_path):
    straight = _plateau_run(tmp_path, "straight", [])
    assert straight["status"] == "finished"
    rates = _logged_rates(tmp_path / "straight")
    stage1 = [lr for _, stage, lr in rates if stage == 1.0]
    assert stage1 == pytest.approx([3e-4, 3e-4, 3e-4, 3e-4, 1.5e-4, 1.5e-4, 7.5e-5, 7.5e-5], rel=1e-6)
    assert [lr for _, stage, lr in rates if stage == 2.0] == pytest.approx([1e-4, 1e-4])  # a new stage: its lr

    first = _plateau_run(tmp_path, "resumed", ["trainer.max_epochs=3"])  # stops inside stage 1
    assert first["stage"] == "aun"
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    # the run was stopped by its own max_epochs=3: the resume lengthens it to the schedule's 8 epochs
    resumed = _plateau_run(tmp_path, "resumed", [f"ckpt_path={last}", "trainer.max_epochs=8"])
    assert resumed["stage"] == "pdf"
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(last, map_location="cpu", weights_only=False)
    different = [k for k, v in a["state_dict"].items()
                 if isinstance(v, torch.Tensor) and not torch.equal(v, b["state_dict"][k])]
    assert not different, f"resumed run differs in {different[:5]}"
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]


def test_quality_levels_and_schedule_errors_name_the_key(tmp_path):
    assert quality_lambda(3, "mse") == 0.0067 and quality_lambda(8, "ms-ssim") == 220.0
    assert len(COMPRESSAI_LAMBDAS["mse"]) == len(COMPRESSAI_LAMBDAS["ms-ssim"]) == 8
    with pytest.raises(ValueError, match=r"module.quality=9: expected an integer from 1 to 8"):
        run_training(tmp_path / "q", [*SHORT, *schedule(), "module.quality=9"])
    with pytest.raises(ConfigError, match=r"schedule.lr_schedule.name='linear': expected one of"):
        LRSchedule.parse({"name": "linear"})
    with pytest.raises(ConfigError, match=r"schedule.lr_schedule.factor=1.5: must be in \(0, 1\]"):
        LRSchedule.parse({"name": "plateau", "factor": 1.5})
    cfg = compose_config(tmp_path / "run", [*SHORT, *schedule(), "+schedule.lr_schedule.warmup=3"])
    with pytest.raises(ConfigError, match=r"schedule.lr_schedule: unknown key\(s\) \['warmup'\]"):
        load_train_module().train(cfg)


@pytest.mark.slow
def test_weight_average_is_what_each_stage_saves_and_resumes_exactly(tmp_path):
    ema = [*SHORT, *schedule(aun=2, mask=2), "ema_decay=0.5", "checkpoint.every_n_train_steps=1"]
    straight = run_training(tmp_path / "straight", ema)
    assert straight["status"] == "finished"
    run_training(tmp_path / "plain", [*SHORT, *schedule(aun=2, mask=2)])
    checkpoints = tmp_path / "straight" / "checkpoints"
    # the stage-1 checkpoint holds the average of stage 1's steps, not the last step's weights
    aun = torch.load(checkpoints / "stage1-aun.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    aun_plain = torch.load(tmp_path / "plain" / "checkpoints" / "stage1-aun.ckpt", map_location="cpu",
                           weights_only=False)["state_dict"]
    assert not torch.equal(aun["model.g_a.0.weight"], aun_plain["model.g_a.0.weight"])
    # frozen parameters are not averaged: the stage-5 model keeps stage 4's encoder exactly
    fix = torch.load(checkpoints / "stage4-fix_encoder.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    pdf = torch.load(checkpoints / "stage5-pdf.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(fix["model.g_a.0.weight"], pdf["model.g_a.0.weight"])
    # stopped inside stage 2 (after its first epoch) and resumed: the average travels in the checkpoint
    run_training(tmp_path / "resumed", [*ema, "trainer.max_epochs=3"])
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert any(key.startswith("WeightAverage") and state["average"] for key, state in saved["callbacks"].items())
    run_training(tmp_path / "resumed", [f"ckpt_path={last}", "trainer.max_epochs=7",
                                        f"paths.output_dir={tmp_path / 'resumed'}"])
    a = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert not [k for k, v in a.items() if isinstance(v, torch.Tensor) and not torch.equal(v, b[k])]


def test_weight_average_decay_out_of_range_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="ema_decay=1.5"):
        run_training(tmp_path, [*SHORT, *schedule(), "ema_decay=1.5"])


def test_callbacks_stand_alone_a_weight_average_without_the_stage_schedule(tmp_path):
    """``~callbacks.stages`` with ``ema_decay`` set: the run is one stage and its last epoch commits the average."""
    result = run_training(tmp_path, [*SHORT, "~callbacks.stages", "ema_decay=0.5", "trainer.max_epochs=2",
                                     "checkpoint.every_n_train_steps=1"])
    assert result["status"] == "finished" and result["stage"] == "aun" and result["stage_report"] == []
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "StageSchedule" not in saved["callbacks"]
    assert saved["callbacks"]["WeightAverage"]["average"] == {}  # committed into the weights at the run's end
