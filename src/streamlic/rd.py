"""Bjøntegaard deltas between two rate-distortion curves (BD-rate, BD-PSNR).

The computation of the JPEG AI and VCEG/JVET common test conditions: each curve is
interpolated with a piecewise-cubic Hermite interpolant (pchip, which follows the points
without overshooting) — log-rate as a function of PSNR for BD-rate, PSNR as a function of
log-rate for BD-PSNR — and the average gap between the two interpolants is taken over the
interval where both curves are defined.

- BD-rate: ``(10**mean(log10 R_test - log10 R_anchor) - 1) * 100``, the average rate change
  in percent at equal quality (negative: the test curve needs fewer bits).
- BD-PSNR: ``mean(PSNR_test - PSNR_anchor)`` in dB at equal rate.

This is the one home of the computation: the sweep summary and ``streamlic eval --compare``
both call :func:`bd_deltas`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MIN_POINTS = 4  # the Bjøntegaard method is defined on (at least) four RD points per curve


class RDCurveError(ValueError):
    """Two curves that have no Bjøntegaard delta (too few points, no overlap, bad values)."""


def _curve(rate: Sequence[float], psnr: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(log10 rate, PSNR)`` of one curve, checked."""
    rate = np.asarray(rate, dtype=np.float64)
    psnr = np.asarray(psnr, dtype=np.float64)
    if rate.shape != psnr.shape or rate.ndim != 1:
        raise RDCurveError(f"{name}: rate and PSNR must be two lists of the same length, got {rate.shape} and "
                           f"{psnr.shape}")
    if len(rate) < MIN_POINTS:
        raise RDCurveError(f"{name}: {len(rate)} RD points; a Bjøntegaard delta needs at least {MIN_POINTS}")
    if not (np.all(np.isfinite(rate)) and np.all(np.isfinite(psnr)) and np.all(rate > 0)):
        raise RDCurveError(f"{name}: rates must be positive and all values finite (rate {rate}, PSNR {psnr})")
    return np.log10(rate), psnr


def _mean_gap(x_anchor: np.ndarray, y_anchor: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              what: str, shown=lambda x: x) -> float:
    """Mean of ``f_test - f_anchor`` over the overlap of the x ranges (f: pchip through the points).

    ``shown`` maps x to the unit the error messages give (rates, not their logarithms).
    """
    for x, name in ((x_anchor, "anchor"), (x_test, "test")):
        if len(np.unique(x)) != len(x):
            raise RDCurveError(f"{name} curve: two points share the same {what}; the interpolation needs distinct "
                               f"values ({np.sort(x)})")
    low = max(x_anchor.min(), x_test.min())
    high = min(x_anchor.max(), x_test.max())
    if not high > low:
        raise RDCurveError(
            f"the curves do not overlap in {what}: anchor [{shown(x_anchor.min()):.4g}, {shown(x_anchor.max()):.4g}], "
            f"test [{shown(x_test.min()):.4g}, {shown(x_test.max()):.4g}]"
        )

    from scipy.interpolate import PchipInterpolator  # here: train.py's start loads this module, scipy takes 0.5 s

    def integral(x: np.ndarray, y: np.ndarray) -> float:
        order = np.argsort(x)
        return float(PchipInterpolator(x[order], y[order]).integrate(low, high))

    return (integral(x_test, y_test) - integral(x_anchor, y_anchor)) / (high - low)


def bd_rate(anchor_rate: Sequence[float], anchor_psnr: Sequence[float], test_rate: Sequence[float],
            test_psnr: Sequence[float]) -> float:
    """BD-rate of the test curve against the anchor, in percent (negative: the test saves rate).

    Rates in any unit (bpp), the same for both curves; quality in dB (PSNR, or MS-SSIM in dB).
    Raises :class:`RDCurveError` for fewer than four points or curves whose quality ranges do
    not overlap.
    """
    log_rate_anchor, psnr_anchor = _curve(anchor_rate, anchor_psnr, "anchor curve")
    log_rate_test, psnr_test = _curve(test_rate, test_psnr, "test curve")
    gap = _mean_gap(psnr_anchor, log_rate_anchor, psnr_test, log_rate_test, "quality (PSNR)")
    return (10.0**gap - 1.0) * 100.0


def bd_psnr(anchor_rate: Sequence[float], anchor_psnr: Sequence[float], test_rate: Sequence[float],
            test_psnr: Sequence[float]) -> float:
    """BD-PSNR of the test curve against the anchor, in dB (positive: the test has higher quality)."""
    log_rate_anchor, psnr_anchor = _curve(anchor_rate, anchor_psnr, "anchor curve")
    log_rate_test, psnr_test = _curve(test_rate, test_psnr, "test curve")
    return _mean_gap(log_rate_anchor, psnr_anchor, log_rate_test, psnr_test, "rate", lambda x: 10.0**x)


def bd_deltas(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """BD-rate and BD-PSNR of ``test`` against ``anchor``, both curves as ``(rate, PSNR)`` points.

    Returns ``{"bd_rate": percent, "bd_psnr": dB}``. The two deltas need different overlaps
    (in PSNR, in rate), so each is computed on its own: one the curves do not have is ``None``,
    with the reason under ``"bd_rate_error"`` / ``"bd_psnr_error"``.
    """
    columns = [[point[i] for point in curve] for curve in (anchor, test) for i in (0, 1)]
    deltas: dict[str, Any] = {}
    for key, delta in (("bd_rate", bd_rate), ("bd_psnr", bd_psnr)):
        try:
            deltas[key] = delta(*columns)
        except RDCurveError as err:
            deltas.update({key: None, f"{key}_error": str(err)})
    return deltas
