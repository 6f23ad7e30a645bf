"""Bjøntegaard deltas (streamlic.rd) on curves whose true delta is known, the curve check, and ``eval --compare``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _models import sample_photos, tiny_model
from streamlic import cli, codec
from streamlic.rd import MIN_RATE_SPAN, RDCurveError, bd_deltas, bd_psnr, bd_rate, curve_problem

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
    with pytest.raises(RDCurveError, match=r"no overlap in PSNR \(anchor 27.1–35, test 37.1–45\)"):
        bd_rate(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP, high_quality)
    with pytest.raises(RDCurveError, match=r"no overlap in rate \(anchor 0.12–0.82, test 12–82\)"):
        bd_psnr(ANCHOR_BPP, ANCHOR_PSNR, [100 * bpp for bpp in ANCHOR_BPP], ANCHOR_PSNR)
    deltas = bd_deltas(list(zip(ANCHOR_BPP, ANCHOR_PSNR)), list(zip(ANCHOR_BPP, high_quality)))
    assert deltas["bd_rate"].startswith("n/a: no overlap in PSNR")
    assert isinstance(deltas["bd_psnr"], float)  # the rates overlap: BD-PSNR is defined


def test_too_few_points_or_bad_values_are_errors():
    with pytest.raises(RDCurveError, match=r"test curve: 3 RD points \(BD-rate needs 4\)"):
        bd_rate(ANCHOR_BPP, ANCHOR_PSNR, ANCHOR_BPP[:3], ANCHOR_PSNR[:3])
    with pytest.raises(RDCurveError, match="anchor curve: rates not all positive"):
        bd_rate([0.0, *ANCHOR_BPP[1:]], ANCHOR_PSNR, ANCHOR_BPP, ANCHOR_PSNR)
    with pytest.raises(RDCurveError, match="anchor curve: PSNR not increasing with rate"):
        bd_rate(ANCHOR_BPP, [27.1, 27.1, 31.2, 33.1, 35.0], ANCHOR_BPP, ANCHOR_PSNR)
    assert math.isfinite(bd_rate(ANCHOR_BPP[:4], ANCHOR_PSNR[:4], ANCHOR_BPP, ANCHOR_PSNR))


# ---------------------------------------------------------------------------- the curve check, many random cases

def _random_curve(rng: np.random.Generator) -> tuple[list[float], list[float], list[float]]:
    """λ, rate and PSNR of a random curve that passes the check: 4-8 points, rising, span 2.5-20x."""
    count = int(rng.integers(4, 9))
    log_rate = np.sort(rng.uniform(-2.0, 0.5, count))
    log_rate = log_rate[0] + (log_rate - log_rate[0]) / np.ptp(log_rate) * np.log10(rng.uniform(2.5, 20.0))
    log_rate += np.arange(count) * 1e-3  # strictly increasing
    psnr = 20.0 + np.cumsum(rng.uniform(0.2, 3.0, count))
    lambdas = np.sort(rng.uniform(1e-3, 0.2, count)) + np.arange(count) * 1e-6
    return list(lambdas), list(10.0**log_rate), list(psnr)


def test_random_monotone_curves_give_the_known_bd_rate_of_a_rate_factor():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lambdas, rate, psnr = _random_curve(rng)
        factor = float(rng.uniform(0.3, 3.0))
        anchor = list(zip(rate, psnr))
        test = [(factor * r, q) for r, q in anchor]
        assert curve_problem(anchor, lambdas) is None
        deltas = bd_deltas(anchor, test, lambdas, lambdas)
        assert deltas["bd_rate"] == pytest.approx((factor - 1.0) * 100.0, abs=1e-8)
        shift = float(rng.uniform(-2.0, 2.0))
        shifted = bd_deltas(anchor, [(r, q + shift) for r, q in anchor], lambdas, lambdas)
        assert shifted["bd_psnr"] == pytest.approx(shift, abs=1e-8)


def test_any_non_monotone_perturbation_is_flagged_with_its_reason():
    rng = np.random.default_rng(1)
    for _ in range(200):
        lambdas, rate, psnr = _random_curve(rng)
        good = list(zip(rate, psnr))
        i = int(rng.integers(1, len(rate)))
        # PSNR of point i at or below point i-1's (same rates): quality does not rise with rate
        lowered = [(r, q if j != i else psnr[i - 1] - float(rng.uniform(0.0, 1.0))) for j, (r, q) in enumerate(good)]
        # rates of points i-1 and i swapped against their λ (same set of points)
        swapped = list(good)
        swapped[i - 1], swapped[i] = swapped[i], swapped[i - 1]
        for curve, reason in ((lowered, "PSNR not increasing with rate"), (swapped, "rate not increasing with λ")):
            assert curve_problem(curve, lambdas) == reason
            deltas = bd_deltas(good, curve, lambdas, lambdas)
            assert deltas == {"bd_rate": f"n/a: test curve: {reason}", "bd_psnr": f"n/a: test curve: {reason}"}
        # without λ the swapped points are a fine curve again
        assert curve_problem(swapped) is None


def test_a_narrow_rate_span_or_few_points_is_flagged():
    rng = np.random.default_rng(2)
    for _ in range(100):
        lambdas, rate, psnr = _random_curve(rng)
        span = float(rng.uniform(1.01, MIN_RATE_SPAN - 0.01))
        narrow = [(rate[0] * span ** (k / (len(rate) - 1)), q) for k, q in enumerate(psnr)]
        assert curve_problem(narrow, lambdas) == f"rate span {span:.2f}x (BD-rate needs {MIN_RATE_SPAN:g}x)"
        count = int(rng.integers(0, 4))
        few = list(zip(rate, psnr))[:count]
        assert curve_problem(few) == f"{count} RD point{'s' * (count != 1)} (BD-rate needs 4)"


# ---------------------------------------------------------------------------- streamlic eval --compare

def _write_checkpoint(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _results(name, bpp, psnr):
    return {"name": name, "results": {"bpp": list(bpp), "psnr-rgb": list(psnr)}}


def test_compare_checks_every_curve_and_gives_text_for_a_missing_bd_rate():
    ours = _results("StreamLIC", ANCHOR_BPP, ANCHOR_PSNR)
    anchors = [_results("anchor", [1.25 * b for b in ANCHOR_BPP], ANCHOR_PSNR),  # we save exactly 20 %
               _results("far", ANCHOR_BPP, [p + 50 for p in ANCHOR_PSNR]),
               _results("bent", ANCHOR_BPP, [27.1, 29.0, 28.0, 33.1, 35.0])]
    lines = codec.evaluate.compare(ours, anchors)
    assert lines[0] == "RD curve of StreamLIC: usable"
    assert "BD-rate of StreamLIC against anchor: -20.00 %; BD-PSNR: " in lines[2]
    assert lines[4].startswith("BD-rate of StreamLIC against far: n/a: no overlap in PSNR (anchor 77.1–85, test")
    assert lines[5:] == ["RD curve of bent: n/a: PSNR not increasing with rate",
                         "BD-rate of StreamLIC against bent: n/a: anchor curve: PSNR not increasing with rate; "
                         "BD-PSNR: n/a: anchor curve: PSNR not increasing with rate"]
    recorded = json.loads(json.dumps(ours))["bd_rate"]  # what the results JSON holds
    assert recorded[0]["bd_rate"] == pytest.approx(-20.0, abs=1e-9) and recorded[0]["anchor_curve"] == "usable"
    assert recorded[1]["bd_rate"].startswith("n/a: no overlap in PSNR") and isinstance(recorded[1]["bd_psnr"], float)
    assert recorded[2]["bd_rate"] == "n/a: anchor curve: PSNR not increasing with rate"


def test_eval_compare_records_the_curve_check_and_bd_rates(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    name, x = sample_photos()[0]
    Image.fromarray(codec.to_uint8(x[0]).permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    # four RD points: two stages of two datapaths of untrained models
    checkpoints = [_write_checkpoint(tiny_model(hardware=hw, stage=stage), tmp_path / f"{hw}-{stage}.ckpt")
                   for hw in ("w12a12", "w8a8") for stage in ("qat", "fix_encoder")]
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps(_results("anchor", ANCHOR_BPP, ANCHOR_PSNR)))
    capsys.readouterr()
    compared = tmp_path / "compared.json"
    assert cli.main(["eval", str(folder), "-c", *map(str, checkpoints), "-o", str(compared), "--compare",
                     str(anchor)]) == 0
    out = capsys.readouterr().out
    results = json.loads(compared.read_text())
    # untrained models: rates within 1.5 % of each other, PSNR not following them
    assert results["curve_check"] == "n/a: PSNR not increasing with rate"
    assert "RD curve of StreamLIC: n/a: PSNR not increasing with rate" in out and "RD curve of anchor: usable" in out
    entry = results["bd_rate"][0]
    assert entry["anchor"] == "anchor" and entry["anchor_curve"] == "usable"
    assert entry["bd_rate"] == entry["bd_psnr"] == "n/a: test curve: PSNR not increasing with rate"
    assert ("BD-rate of StreamLIC against anchor: n/a: test curve: PSNR not increasing with rate; "
            "BD-PSNR: n/a: test curve: PSNR not increasing with rate") in out
