"""Bjøntegaard deltas (streamlic.rd) on curves whose true delta is known, and in ``streamlic eval --compare``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from _models import sample_photos, tiny_model
from streamlic import cli, codec
from streamlic.rd import RDCurveError, bd_psnr, bd_rate

# a concave, CompressAI-like curve: PSNR against bpp
ANCHOR_BPP = [0.12, 0.21, 0.35, 0.55, 0.82]
ANCHOR_PSNR = [27.1, 29.0, 31.2, 33.1, 35.0]


def test_rate_scaled_by_a_constant_factor_gives_that_factor():
    test_bpp = [0.8 * bpp for bpp in ANCHOR_BPP]  # 20 % fewer bits at every quality
    assert bd_rate(ANCHOR_BPP, ANCHOR_PSNR, test_bpp, ANCHOR_PSNR) == pytest.approx(-20.0, abs=1e-9)
    # the other way round: 1 / 0.8 = +25 %
    assert bd_rate(test_bpp, ANCHOR_PSNR, ANCHOR_BPP, ANCHOR_PSNR) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP, ANCHOR_PSNR) == pytest.approx(0.0, abs=1e-12)


def test_quality_shifted_by_a_constant_gives_that_bd_psnr():
    test_psnr = [psnr + 0.7 for psnr in ANCHOR_PSNR]
    assert bd_psnr(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP, test_psnr) == pytest.approx(0.7, abs=1e-9)


def test_partially_overlapping_curves_use_the_common_interval_only():
    # log10(rate) = (PSNR - 30) / 10 for the anchor, (PSNR - 31) / 10 for the test: at equal PSNR the
    # test needs 10**-0.1 of the rate (-20.57 %); at equal rate it is 1 dB better. Different samples,
    # overlapping only on [32, 36] dB (pchip reproduces straight lines exactly).
    anchor_psnr = [30.0, 32.0, 34.0, 36.0]
    test_psnr = [32.0, 33.5, 36.5, 38.0]
    anchor_bpp = [10 ** ((p - 30) / 10) for p in anchor_psnr]
    test_bpp = [10 ** ((p - 31) / 10) for p in test_psnr]
    assert bd_rate(anchor_bpp, anchor_psnr, test_bpp, test_psnr) == pytest.approx((10**-0.1 - 1) * 100, abs=1e-9)
    assert bd_psnr(anchor_bpp, anchor_psnr, test_bpp, test_psnr) == pytest.approx(1.0, abs=1e-9)
    # point order does not matter
    assert bd_rate(anchor_bpp[::-1], anchor_psnr[::-1], test_bpp, test_psnr) == pytest.approx(-20.567, abs=1e-3)


def test_non_overlapping_curves_are_a_clear_error():
    high_quality = [psnr + 10.0 for psnr in ANCHOR_PSNR]  # 37.1 .. 45 dB against 27.1 .. 35 dB
    with pytest.raises(RDCurveError, match=r"do not overlap in quality.*anchor \[27.1, 35\].*test \[37.1, 45\]"):
        bd_rate(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP, high_quality)
    with pytest.raises(RDCurveError, match=r"do not overlap in rate: anchor \[0.12, 0.82\], test \[12, 82\]"):
        bd_psnr(ANCHOR_BPP, ANCHOR_PSNR, [100 * bpp for bpp in ANCHOR_BPP], ANCHOR_PSNR)


def test_too_few_points_or_bad_values_are_errors():
    with pytest.raises(RDCurveError, match="test curve: 3 RD points; .* at least 4"):
        bd_rate(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP[:3], ANCHOR_PSNR[:3])
    with pytest.raises(RDCurveError, match="anchor curve: rates must be positive"):
        bd_rate([0.0, *ANCHOR_BPP[1:]], ANCHOR_PSNR, ANCHOR_BPP, ANCHOR_PSNR)
    with pytest.raises(RDCurveError, match="same quality"):
        bd_rate(ANCHOR_BPP, [27.1, 27.1, 31.2, 33.1, 35.0], ANCHOR_BPP, ANCHOR_PSNR)
    assert math.isfinite(bd_rate(ANCHOR_BPP[:4], ANCHOR_PSNR[:4], ANCHOR_BPP, ANCHOR_PSNR))


# ---------------------------------------------------------------------------- streamlic eval --compare

def _write_checkpoint(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_eval_compare_prints_and_records_the_bd_rate(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    name, x = sample_photos()[0]
    Image.fromarray(codec.to_uint8(x[0]).permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    # four RD points with distinct quality: two stages of two datapaths (stage 5 would repeat stage 4's PSNR)
    checkpoints = [_write_checkpoint(tiny_model(hardware=hw, stage=stage), tmp_path / f"{hw}-{stage}.ckpt")
                   for hw in ("w12a12", "w8a8") for stage in ("qat", "fix_encoder")]
    ours = tmp_path / "ours.json"
    assert cli.main(["eval", str(folder), "-c", *map(str, checkpoints), "-o", str(ours)]) == 0
    results = json.loads(ours.read_text())
    # an anchor that needs 25 % more rate at every quality: we save exactly 20 %
    anchor = {"name": "anchor", "results": {"bpp": [1.25 * b for b in results["results"]["bpp"]],
                                            "psnr": results["results"]["psnr-rgb"]}}
    far = {"name": "far", "results": {"bpp": results["results"]["bpp"],
                                      "psnr-rgb": [p + 50 for p in results["results"]["psnr-rgb"]]}}
    for entry in (anchor, far):
        (tmp_path / f"{entry['name']}.json").write_text(json.dumps(entry))
    capsys.readouterr()
    compared = tmp_path / "compared.json"
    assert cli.main(["eval", str(folder), "-c", *map(str, checkpoints), "-o", str(compared), "--compare",
                     str(tmp_path / "anchor.json"), str(tmp_path / "far.json")]) == 0
    out = capsys.readouterr().out
    assert "BD-rate of StreamLIC against anchor: -20.00 %; BD-PSNR: " in out
    assert "BD-rate of StreamLIC against far: not available (the curves do not overlap in quality" in out
    recorded = json.loads(compared.read_text())["bd_rate"]
    assert recorded[0]["anchor"] == "anchor" and recorded[0]["bd_rate"] == pytest.approx(-20.0, abs=1e-9)
    assert recorded[1]["anchor"] == "far" and recorded[1]["bd_rate"] is None
    assert "do not overlap in quality" in recorded[1]["bd_rate_error"]
