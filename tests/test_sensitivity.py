"""``streamlic sensitivity``: one layer quantized at a time, the allocations and their constraints, the command's files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch

from _models import TINY_MODEL, rd_loss, tiny_model
from _training import ROOT, TINY, compose_config, run_training, schedule, script_env
from callbacks import STAGE_CHECKPOINT_NAMES
from streamlic import StreamLIC, topology
from streamlic.config import ModelConfig, hardware_config
from streamlic.layers import LAGC
from streamlic.sensitivity import (allocate, allocation_config, measure_layers, run_study, uniform_config,
                                  weighted_specs, weights_at)
from streamlic.sensitivity_report import JSON_FILE, MARKDOWN_FILE, PLOT_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(**TINY_MODEL)
ENGINE = tuple(topology.sparse_paths(CFG).values())
LATENT_WRITERS = tuple(spec.path for spec in topology.layers(CFG) if spec.fixed_scale)


def _used_weight(model: StreamLIC, path: str) -> torch.Tensor:
    """The weight a layer quantizes, as it computes with it (masked), a copy."""
    layer = model.get_submodule(path)
    return (layer.affine.weight if isinstance(layer, LAGC) else layer.effective_weight()).detach().clone()


def test_one_layer_weights_are_per_channel_symmetric_at_w_bits_and_restored_after():
    model = tiny_model("w12a12", "mask")
    before = {name: value.clone() for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    for path in ("g_a.2", "g_a.1", "context_prediction.1"):  # a convolution, an LAGC, a masked block-sparse layer
        used = _used_weight(model, path)
        with weights_at(model.get_submodule(path), uniform_config(8)):
            quantized = _used_weight(model, path)
        levels = quantized / (used.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.abs().max() <= 127 + 1e-3
        assert torch.equal(quantized.abs().amax(dim=(1, 2, 3)), used.abs().amax(dim=(1, 2, 3)))
        assert 0 < (quantized - used).abs().max() <= (used.abs().amax() / 254) * 1.001  # half a step at most
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items()
               if isinstance(value, torch.Tensor))


def test_a_layer_changes_the_loss_less_at_12_bits_than_at_8(photos):
    model = tiny_model("w12a12", "mask")
    with torch.no_grad():
        changes = measure_layers(model, lambda: float(rd_loss(model, photos)), (8, 12))
    assert set(changes) == set(weighted_specs(CFG))
    for kind in ("weight", "activation"):
        mean = {w: sum(abs(c[kind][w]) for c in changes.values()) / len(changes) for w in (8, 12)}
        assert mean[12] < mean[8], (kind, mean)
    # the float stages compute the latent grid at the 12-bit datapath's step and range: nothing changes
    assert all(changes[path]["activation"][12] == 0.0 for path in LATENT_WRITERS)


def _changes(generator: torch.Generator) -> dict[str, dict]:
    """Random changes that fall with the width, in [0, 4] % at 8 bits."""
    changes = {}
    for path in weighted_specs(CFG):
        changes[path] = {}
        for kind in ("weight", "activation"):
            at_8 = 0.04 * float(torch.rand((), generator=generator))
            changes[path][kind] = {8: at_8, 10: at_8 / 4, 12: at_8 / 16}
    return changes


def test_allocations_give_each_layer_its_lowest_width_within_tolerance_and_keep_the_hardware_ties():
    generator = torch.Generator().manual_seed(0)
    for tolerance in (0.5, 1.0, 2.0):
        changes = _changes(generator)
        changes["context_prediction.1"]["weight"] = {8: 0.0, 10: 0.0, 12: 0.0}
        changes["entropy_parameters.2"]["weight"] = {8: 0.5, 10: 0.5, 12: 0.0}  # ep needs 12-bit weights
        hw = allocation_config(allocate(changes, (8, 10, 12), tolerance, CFG), "test", CFG)
        CFG.validate_against(hw)
        assert hardware_config(hw.to_dict()) == hw  # a valid config, built again from its own dict
        engine = {(hw.for_layer(path).weight_bits, hw.for_layer(path).activation_bits) for path in ENGINE}
        assert engine == {(12, hw.latent_width)}  # one width, the widest any of its layers needs
        assert all(hw.for_layer(path).activation_bits == hw.latent_width for path in LATENT_WRITERS)
        assert hw.latent_width == max(min([w for w in (8, 10, 12) if changes[path]["activation"][w] <= tolerance / 100]
                                          or [12]) for path in (*ENGINE, *LATENT_WRITERS))
        for path in set(changes) - {*ENGINE, *LATENT_WRITERS}:
            for kind, key in (("weight", "weight_bits"), ("activation", "activation_bits")):
                within = [w for w in (8, 10, 12) if changes[path][kind][w] <= tolerance / 100]
                assert getattr(hw.for_layer(path), key) == (min(within) if within else 12), (path, kind)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Stages 1 and 2 of the tiny model, trained by train.py's own code: stage1-aun.ckpt and stage2-mask.ckpt."""
    out = tmp_path_factory.mktemp("sensitivity_run")
    run_training(out, [*TINY, *schedule(aun=3, mask=1, aun_lr=1e-3), "schedule.max_epochs=4", "test=false"])
    return out / "checkpoints"


def _command(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlic.cli", "sensitivity", *map(str, args)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=300)


def test_a_stage_1_checkpoint_is_one_error_line(tiny_run, tmp_path):
    stage1 = tiny_run / STAGE_CHECKPOINT_NAMES["aun"]
    done = _command(stage1, "-o", tmp_path / "out")
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("ERROR CKPT=") and str(stage1) in lines[0] and "stage 2" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_before_the_study(tiny_run, tmp_path):
    taken = tmp_path / "results.txt"
    taken.write_text("kept")
    done = _command(tiny_run / STAGE_CHECKPOINT_NAMES["mask"], "-o", taken, "--force")
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and lines == [f"ERROR {taken}: not a folder (-o names the folder of the study's "
                                              "outputs)"], lines
    assert taken.read_text() == "kept"


def test_every_measured_config_keeps_the_checkpoints_block_size(tmp_path):
    # a run at 8x8 blocks: its masks are cut in them, so an allocation or a reference point at the default
    # 12x12 blocks could not even load its weights
    out = tmp_path / "blocks8"
    run_training(out, [*TINY, *schedule(aun=1, mask=1), "schedule.max_epochs=2", "test=false",
                       "hardware.block_in=8", "hardware.block_out=8"])
    results = run_study(out / "checkpoints" / STAGE_CHECKPOINT_NAMES["mask"], widths=(8, 12), tolerances=(1.0,))
    configs = results["allocations"] + results["uniform"]
    assert [config["name"] for config in configs] == ["beta=1%", "w12a12", "w8a8"]
    assert all((config["hardware"]["block_in"], config["hardware"]["block_out"]) == (8, 8) for config in configs)


def _independent_uniform_cost(stage2, bits: int, image_size) -> tuple[float, int]:
    """Σ MACs/px × W × A_in and Σ weights × W of a uniform config, from the topology table and the tensors."""
    state = StreamLIC.checkpoint_state_dict(stage2)
    height, width = image_size
    specs = weighted_specs(CFG)
    cost, memory = 0.0, 0
    for path, (rows, columns) in topology.layer_geometry(CFG, height, width).items():
        spec = specs[path]
        mask = state.get(f"{path}.mask")
        active = None if mask is None else int(mask.sum())
        input_bits = {"g_a.0": min(bits, 9), "h_s.0": 8}.get(path, bits)  # the image, the 8-bit hyper symbols
        cost += topology.macs_per_position(spec, active) * rows * columns / (height * width) * bits * input_bits
        weights = state[f"{path}.affine.weight" if spec.kind == topology.LAGC else f"{path}.weight"].numel()
        memory += (weights if active is None else active) * bits
    return cost, memory


def test_the_command_writes_json_table_and_plot_with_valid_allocations(tiny_run, tmp_path):
    stage2, out = tiny_run / STAGE_CHECKPOINT_NAMES["mask"], tmp_path / "out"
    done = _command(stage2, "-o", out)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / JSON_FILE).read_text())
    assert set(results) >= {"float", "changes", "allocations", "uniform", "widths", "seconds"}
    assert set(results["changes"]) == set(weighted_specs(CFG))
    assert all(set(c[kind]) == {"8", "10", "12"} for c in results["changes"].values() for kind in ("weight", "activation"))
    assert [a["name"] for a in results["allocations"]] == ["beta=0.5%", "beta=1%", "beta=2%"]
    assert [u["name"] for u in results["uniform"]] == ["w12a12", "w8a8"]
    # the resolution: the largest |change| at the widest width, named with its layer; the table states it
    assert results["resolution"]["change"] == max(abs(c[kind]["12"]) for c in results["changes"].values()
                                                  for kind in ("weight", "activation"))
    assert abs(results["changes"][results["resolution"]["layer"]][results["resolution"]["kind"]]["12"]) == \
        results["resolution"]["change"]
    table = (out / MARKDOWN_FILE).read_text()
    assert f"Resolution: {100 * results['resolution']['change']:.2f} %" in table
    assert table in done.stdout and all(f"| {path} |" in table for path in results["changes"])
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for record in results["allocations"] + results["uniform"]:
        hw = hardware_config(record["hardware"])  # the config's own validation judges it
        assert set(record["layers"]) == set(results["changes"])
        assert all((layer["weight_bits"], layer["activation_bits"]) == (hw.for_layer(path).weight_bits,
                                                                        hw.for_layer(path).activation_bits)
                   for path, layer in record["layers"].items())
        assert len({(record["layers"][path]["weight_bits"], record["layers"][path]["activation_bits"])
                    for path in ENGINE}) == 1
        assert all(record["layers"][path]["activation_bits"] == record["latent_bits"] for path in LATENT_WRITERS)
        assert record["qat_entry"]["change"] == pytest.approx(record["qat_entry"]["loss"] / results["float"]["loss"] - 1)
    w12a12, w8a8 = results["uniform"]
    for record, bits in ((w12a12, 12), (w8a8, 8)):
        cost, memory = _independent_uniform_cost(stage2, bits, record["image_size"])
        assert record["bit_cost"] == pytest.approx(cost, rel=1e-12) and record["weight_memory_bits"] == memory
    # the printed command trains the allocation: Hydra composes its overrides into the same widths
    allocation = results["allocations"][1]
    overrides = [arg for arg in shlex.split(allocation["override"])[2:] if not arg.startswith("init_from=")]
    composed = compose_config(tmp_path / "compose", overrides)
    assert hardware_config(dict(composed.hardware)) == hardware_config(allocation["hardware"])
    # and so do the hardware-group files the sweep line names
    sweep = shlex.split(results["sweep"])
    searchpath = next(arg for arg in sweep if arg.startswith("hydra.searchpath="))
    names = next(arg for arg in sweep if arg.startswith("hardware=")).split("=")[1].split(",")
    assert names == ["beta0.5", "beta1", "beta2", "w12a12", "w8a8"]
    for record in results["allocations"] + results["uniform"]:
        composed = compose_config(tmp_path / "compose", [searchpath, f"hardware={record['hardware']['name']}"])
        assert hardware_config(dict(composed.hardware)) == hardware_config(record["hardware"])
