"""Stage checkpoints as starting points: float stages independent of the bit widths, ``init_from`` across
bit widths with what the checkpoint fixes taken from it, and one ERROR line for every mismatch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from _training import TINY, run_script, run_training, schedule
from callbacks import STAGE_CHECKPOINT_NAMES
from streamlic.model import StreamLIC

pytestmark = pytest.mark.usefixtures("one_thread")  # as in the train.py subprocesses

HARDWARE_RUN = [*TINY, *schedule(), "test=false", "trainer.limit_train_batches=2"]
NOT_FROM_CHECKPOINT = [arg for arg in TINY if arg not in ("model=tiny", "export=false")]  # the checkpoint has them


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in StreamLIC.checkpoint_state_dict(path).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def hardware_runs(tmp_path_factory) -> Path:
    """The same seed and config with 12-bit (all five stages) and 8-bit (the float stages) hardware."""
    root = tmp_path_factory.mktemp("hardware")
    assert run_training(root / "w12a12", [*HARDWARE_RUN, "hardware=w12a12"])["status"] == "finished"
    assert run_training(root / "w8a8", [*HARDWARE_RUN, "hardware=w8a8", "trainer.max_epochs=2"])["stage"] == "mask"
    return root


@pytest.mark.slow
def test_float_stages_do_not_depend_on_the_bit_widths(hardware_runs):
    for stage in ("aun", "mask"):
        w12 = _model_state(hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES[stage])
        w8 = _model_state(hardware_runs / "w8a8" / "checkpoints" / STAGE_CHECKPOINT_NAMES[stage])
        assert w12.keys() == w8.keys()
        different = [key for key, value in w12.items() if not torch.equal(value, w8[key])]
        assert not different, f"{stage}: weights, statistics or masks differ in {different[:5]}"
    report = [json.loads((hardware_runs / hw / "stage_report.json").read_text())["stages"][:2]
              for hw in ("w12a12", "w8a8")]
    assert report[0] == [{**row, "checkpoint": row["checkpoint"].replace("w8a8", "w12a12")} for row in report[1]]


@pytest.mark.slow
def test_init_from_a_float_checkpoint_trains_and_exports_another_bit_width(hardware_runs, tmp_path):
    stage2 = hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    out = tmp_path / "w8a8"
    # no model=tiny: the sizes (and the block size) come from the checkpoint
    done = run_script([*NOT_FROM_CHECKPOINT, *schedule(), f"init_from={stage2}", "hardware=w8a8",
                       "trainer.limit_train_batches=2", f"hydra.run.dir={out}"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["status"], results["stage"], results["hardware"]) == ("finished", "pdf", "w8a8")
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["bit_widths"]["activation"] == manifest["bit_widths"]["weight"] == 8
    assert manifest["config"]["model"] == {"c1": 12, "c2": 12, "c3": 24, "M": 24, "N": 12}


@pytest.mark.slow
@pytest.mark.parametrize("stage, overrides, error", [
    ("qat", ["hardware=w8a8"], "ERROR hardware.activation_bits=8: init_from={path} has hardware.activation_bits=12, "
                               "fixed by its stage (qat); a different bit width starts from a checkpoint before QAT "
                               "(stage1-aun.ckpt or stage2-mask.ckpt)"),
    ("mask", ["hardware.block_in=6"], "ERROR hardware.block_in=6: init_from={path} has hardware.block_in=12, fixed "
                                      "by its stage (mask)"),
    ("mask", ["model=streamlic"], "ERROR model.c1=48: init_from={path} has model.c1=12, fixed by its model sizes"),
    ("mask", ["model=tiny", "sparsity.density=0.5"],
     "ERROR sparsity.density=0.5: init_from={path} has sparsity.density=None, fixed by its masks, already cut; "
     "other densities start from a stage-1 checkpoint (stage1-aun.ckpt)"),
    ("pdf", [], "ERROR init_from={path}: the checkpoint is in the last stage (pdf); nothing is left to train"),
    ("mask", ["trainer.max_epochs=2"], "ERROR trainer.max_epochs=2: init_from={path} starts the run at stage qat, "
                                       "schedule epoch 23, so it would train no epoch"),
])
def test_a_checkpoint_config_mismatch_is_one_error_line(hardware_runs, tmp_path, stage, overrides, error):
    path = hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES[stage]
    done = run_script([f"init_from={path}", *overrides], timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [error.format(path=path)], done.stderr
    assert list(tmp_path.iterdir()) == [], "a run that never trained left files behind"


@pytest.mark.parametrize("overrides, error", [
    (["module.lmbda=abc"], "ERROR module.lmbda='abc': must be a positive number"),
    (["init_from=missing.ckpt"], "ERROR init_from=missing.ckpt: no such checkpoint file"),
    (["init_from={readme}"], "ERROR init_from={readme}: not a checkpoint (neither a torch zip archive nor a pickle)"),
    (["init_from={state}"], "ERROR init_from={state}: not a StreamLIC checkpoint (no model stage state in it)"),
    # per-layer widths (the nested keys Hydra makes of a layer path), checked before torch is imported
    (["+hardware.layers.g_x.weight_bits=8"], "ERROR hardware.layers.g_x: no such sub-network or weighted layer "
     "(sub-networks g_a, h_a, h_s, g_s, context_prediction, entropy_parameters; layers such as g_a.0, h_s.2, "
     "context_prediction.1)"),
    (["+hardware.layers.g_a.0.activation_bits=7"],
     "ERROR hardware.layers.g_a.0.activation_bits=7: must lie in [8, 15] (8-bit symbols need A >= 8)"),
    (["+hardware.layers.g_s.activation_bits=10", "+hardware.layers.g_s.precision_bits=11"],
     "ERROR hardware.layers.g_s.precision_bits=11: must be at least activation_bits + 2 = 12"),
    (["+hardware.layers.h_s.2.activation_bits=8"],
     "ERROR hardware.layers.h_s.2.activation_bits=8: h_s.2 writes the latent grid, whose width is 12 "
     "(hardware.latent_bits, else the width of entropy_parameters.2); set hardware.latent_bits instead"),
    (["+hardware.layers.g_a.act_bits=8"], "ERROR hardware.layers.g_a.act_bits=8: not a width key of a layer or "
     "sub-network (hardware.layers.<sub-network or layer path>.<activation_bits | weight_bits | precision_bits>)"),
    pytest.param(["trainer=gpu", "model=tiny"], "ERROR trainer.accelerator=gpu, trainer.devices=1: No supported gpu "
                 "backend found! (trainer=cpu trains on the CPU)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")),
])
def test_a_command_line_mistake_is_one_error_line_and_leaves_nothing(tmp_path, overrides, error):
    files = tmp_path / "files"
    files.mkdir()
    names = {"readme": Path(__file__).parents[1] / "README.md", "state": files / "other.pt"}
    torch.save({"weight": torch.zeros(2)}, names["state"])
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    done = run_script([override.format(**names) for override in overrides], timeout=120, cwd=run_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [error.format(**names)], done.stderr
    assert list(run_dir.iterdir()) == [], "a run that never trained left files behind"


@pytest.mark.slow
def test_the_readme_hardware_sweep_from_one_stage2_checkpoint(hardware_runs, tmp_path):
    stage2 = hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    sweep = tmp_path / "sweep"
    # the README's command, with the tiny test schedule and data
    done = run_script(["-m", f"init_from={stage2}", "hardware=w12a12,w8a8", "module.lmbda=0.0067,0.013",
                       *NOT_FROM_CHECKPOINT, *schedule(), "trainer.limit_train_batches=2", "test=false",
                       "export=false", f"hydra.sweep.dir={sweep}"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["overrides"].split()[1:3] for row in rows] == [
        [f"hardware={hw}", f"module.lmbda={lmbda}"] for hw in ("w12a12", "w8a8") for lmbda in ("0.0067", "0.013")]
    assert all(row["status"] == "finished" and row["stage"] == "pdf" for row in rows)
    for job, hw in enumerate(("w12a12", "w12a12", "w8a8", "w8a8")):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        assert results["hardware"] == hw and results["stage_report"][0]["stage"] == "qat"


@pytest.mark.slow
def test_init_from_a_float_checkpoint_trains_per_layer_widths_that_the_qat_checkpoint_then_fixes(hardware_runs,
                                                                                                  tmp_path):
    stage2 = hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    out = tmp_path / "mixed"
    done = run_script([*NOT_FROM_CHECKPOINT, *schedule(), f"init_from={stage2}", "+hardware.layers.g_s.weight_bits=8",
                       "+hardware.layers.g_a.0.activation_bits=10", "trainer.max_epochs=3",
                       "trainer.limit_train_batches=2", f"hydra.run.dir={out}"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["stage"] == "qat"
    qat = out / "checkpoints" / STAGE_CHECKPOINT_NAMES["qat"]
    model = StreamLIC.from_checkpoint(qat)
    assert model.hw.layers == {"g_a.0": {"activation_bits": 10}, "g_s": {"weight_bits": 8}}
    assert (model.g_a[0].hw.activation_bits, model.g_s[0].hw.weight_bits, model.g_a[2].hw.weight_bits) == (10, 8, 12)
    # from QAT on the widths are the checkpoint's: another per-layer width is one error line
    later = tmp_path / "later"
    later.mkdir()
    done = run_script([f"init_from={qat}", "+hardware.layers.g_s.weight_bits=10"], timeout=120, cwd=later)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"ERROR hardware.layers={{'g_s': {{'weight_bits': 10}}}}: init_from={qat} has hardware.layers="
        "{'g_a.0': {'activation_bits': 10}, 'g_s': {'weight_bits': 8}}, fixed by its stage (qat); a different bit "
        "width starts from a checkpoint before QAT (stage1-aun.ckpt or stage2-mask.ckpt)"], done.stderr


@pytest.mark.slow
def test_a_context_engine_of_mixed_widths_is_refused_before_training_unless_export_is_off(hardware_runs, tmp_path):
    stage2 = hardware_runs / "w12a12" / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"]
    out = tmp_path / "run"
    args = [*NOT_FROM_CHECKPOINT, *schedule(), f"init_from={stage2}", "test=false",
            "+hardware.layers.entropy_parameters.activation_bits=8", "trainer.max_epochs=3",
            "trainer.limit_train_batches=2", f"hydra.run.dir={out}"]
    refused = [
        "ERROR the context engine runs on one width, but its layers differ: context_prediction.1 A=12 W=12 P=16 "
        "(hardware.activation_bits, hardware.weight_bits); context_prediction.3 A=8 W=12 P=12 (hardware.layers."
        "entropy_parameters.activation_bits, hardware.weight_bits); entropy_parameters.0 A=8 W=12 P=12 "
        "(hardware.layers.entropy_parameters.activation_bits, hardware.weight_bits); entropy_parameters.2 A=8 W=12 "
        "P=12 (hardware.layers.entropy_parameters.activation_bits, hardware.weight_bits); give them the same "
        "hardware.layers widths (ctx2 and ep write the latent grid: hardware.latent_bits); or export=false to train "
        "it without a hardware package"]
    done = run_script([*args, "export=true"], timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == refused, done.stderr[-3000:]
    assert not out.exists()  # refused before anything was written
    # without the package it trains (`streamlic export` of its checkpoint is the same refusal: test_layer_widths)
    done = run_script([*args, "export=false"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["stage"], results["status"]) == ("qat", "finished")
    qat = out / "checkpoints" / STAGE_CHECKPOINT_NAMES["qat"]
    assert qat.is_file()
    # its widths come from the checkpoint, not the command line: continuing it with the package is refused
    # before training too, from its QAT checkpoint (a new run) or resumed with export=true
    later = tmp_path / "later"
    done = run_script([*NOT_FROM_CHECKPOINT, *schedule(), f"init_from={qat}", "test=false", "export=true",
                       f"hydra.run.dir={later}"], timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == refused, done.stderr[-3000:]
    assert not later.exists()
    done = run_script([f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "export=true", "trainer.max_epochs=4",
                       f"hydra.run.dir={out}"], timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == refused, done.stderr[-3000:]
    assert not (out / "checkpoints" / STAGE_CHECKPOINT_NAMES["fix_encoder"]).exists()
