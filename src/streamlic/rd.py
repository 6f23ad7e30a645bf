"""Bjøntegaard deltas between two rate-distortion curves (BD-rate, BD-PSNR).

The computation of the JPEG AI and VCEG/JVET common test conditions: each curve is
interpolated with a piecewise-cubic Hermite interpolant (pchip, which follows the points
without overshooting) — log-rate as a function of PSNR for BD-rate, PSNR as a function of
log-rate for BD-PSNR — and the average gap between the two interpolants is taken over the
interval where both curves are defined.

- BD-rate: ``(10**mean(log10 R_test - log10 R_anchor) - 1) * 100``, the average rate change
  in percent at equal quality (negative: the test curve needs fewer bits).
- BD-PSNR: ``mean(PSNR_test - PSNR_anchor)`` in dB at equal rate.

Before any delta, each curve is checked (:func:`curve_problem`), as the common test
conditions assume of their anchors (Bjøntegaard, VCEG-M33; VCEG-AL22; JVET CTC): at least four
RD points, rate strictly increasing with λ (when λ is known), quality strictly increasing with
rate, and a rate span worth interpolating: the largest rate at least :data:`MIN_RATE_SPAN`
times the smallest (the CTC's four QPs 22–37 span about 5–10x in rate; one doubling is the
least we accept from a short training). A curve that fails has no delta, only its reason; two
curves whose quality (for BD-rate) or rate (for BD-PSNR) ranges do not overlap have none either.

This is the one home of the computation: the sweep summary and ``streamlic eval --compare``
both call :func:`bd_deltas`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MIN_POINTS = 4  # the Bjøntegaard method is defined on (at least) four RD points per curve
MIN_RATE_SPAN = 2.0  # largest / smallest rate of a curve: at least one doubling


class RDCurveError(ValueError):
    """Two curves that have no Bjøntegaard delta (a curve that fails the check, no overlap)."""


def curve_problem(points: Sequence[tuple[float, float]], lambdas: Sequence[float] | None = None,
                  quality: str = "PSNR") -> str | None:
    """Why the RD curve ``points`` (``(rate, quality)`` pairs) gives no Bjøntegaard delta; ``None`` if it does.

    ``lambdas``, one per point, adds the check that the rate rises with λ; ``quality`` names
    the quality metric in the reason ("PSNR not increasing with rate").
    """
    if len(points) < MIN_POINTS:
        return f"{len(points)} RD point{'s' * (len(points) != 1)} (BD-rate needs {MIN_POINTS})"
    rate = np.array([point[0] for point in points], dtype=np.float64)
    value = np.array([point[1] for point in points], dtype=np.float64)
    if not (np.all(np.isfinite(rate)) and np.all(np.isfinite(value)) and np.all(rate > 0)):
        return "rates not all positive or values not all finite"
    if lambdas is not None:
        if len(lambdas) != len(points):
            raise ValueError(f"{len(lambdas)} lambdas for {len(points)} RD points")
        by_lambda = np.argsort(np.asarray(lambdas, dtype=np.float64), kind="stable")
        if len(set(lambdas)) != len(lambdas) or not np.all(np.diff(rate[by_lambda]) > 0):
            return "rate not increasing with λ"
    by_rate = np.lexsort((value, rate))
    if not (np.all(np.diff(rate[by_rate]) > 0) and np.all(np.diff(value[by_rate]) > 0)):
        return f"{quality} not increasing with rate"
    span = rate.max() / rate.min()
    if span < MIN_RATE_SPAN:
        return f"rate span {span:.2f}x (BD-rate needs {MIN_RATE_SPAN:g}x)"
    return None


def _curve(rate: Sequence[float], psnr: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(log10 rate, PSNR)`` of one curve that passes :func:`curve_problem`."""
    rate = np.asarray(rate, dtype=np.float64)
    psnr = np.asarray(psnr, dtype=np.float64)
    if rate.shape != psnr.shape or rate.ndim != 1:
        raise RDCurveError(f"{name}: rate and PSNR must be two lists of the same length, got {rate.shape} and "
                           f"{psnr.shape}")
    problem = curve_problem(list(zip(rate, psnr)))
    if problem:
        raise RDCurveError(f"{name}: {problem}")
    return np.log10(rate), psnr


def _mean_gap(x_anchor: np.ndarray, y_anchor: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              what: str, shown=lambda x: x) -> float:
    """Mean of ``f_test - f_anchor`` over the overlap of the x ranges (f: pchip through the points).

    ``shown`` maps x to the unit the error messages give (rates, not their logarithms).
    """
    low = max(x_anchor.min(), x_test.min())
    high = min(x_anchor.max(), x_test.max())
    if not high > low:
        raise RDCurveError(
            f"no overlap in {what} (anchor {shown(x_anchor.min()):.4g}–{shown(x_anchor.max()):.4g}, "
            f"test {shown(x_test.min()):.4g}–{shown(x_test.max()):.4g})"
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
    Raises :class:`RDCurveError` for a curve that fails :func:`curve_problem` or curves whose
    quality ranges do not overlap.
    """
    log_rate_anchor, psnr_anchor = _curve(anchor_rate, anchor_psnr, "anchor curve")
    log_rate_test, psnr_test = _curve(test_rate, test_psnr, "test curve")
    gap = _mean_gap(psnr_anchor, log_rate_anchor, psnr_test, log_rate_test, "PSNR")
    return (10.0**gap - 1.0) * 100.0


def bd_psnr(anchor_rate: Sequence[float], anchor_psnr: Sequence[float], test_rate: Sequence[float],
            test_psnr: Sequence[float]) -> float:
    """BD-PSNR of the test curve against the anchor, in dB (positive: the test has higher quality)."""
    log_rate_anchor, psnr_anchor = _curve(anchor_rate, anchor_psnr, "anchor curve")
    log_rate_test, psnr_test = _curve(test_rate, test_psnr, "test curve")
    return _mean_gap(log_rate_anchor, psnr_anchor, log_rate_test, psnr_test, "rate", lambda x: 10.0**x)


def not_available(reason: str) -> str:
    """The text that stands where a delta cannot: ``"n/a: <reason>"`` (in tables, CSV and JSON alike)."""
    return f"n/a: {reason}"


def bd_deltas(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]],
              anchor_lambdas: Sequence[float] | None = None,
              test_lambdas: Sequence[float] | None = None) -> dict[str, float | str]:
    """BD-rate and BD-PSNR of ``test`` against ``anchor``, both curves as ``(rate, PSNR)`` points.

    Returns ``{"bd_rate": percent, "bd_psnr": dB}``. Each curve is checked first
    (:func:`curve_problem`, with its λ of each point when given); a curve that fails gives
    neither delta. The two deltas need different overlaps (in PSNR, in rate), so each is
    computed on its own. A delta that is not there is the text ``"n/a: <reason>"``, never a number.
    """
    for name, curve, lambdas in (("anchor", anchor, anchor_lambdas), ("test", test, test_lambdas)):
        problem = curve_problem(curve, lambdas)
        if problem:
            reason = not_available(f"{name} curve: {problem}")
            return {"bd_rate": reason, "bd_psnr": reason}
    columns = [[point[i] for point in curve] for curve in (anchor, test) for i in (0, 1)]
    deltas: dict[str, float | str] = {}
    for key, delta in (("bd_rate", bd_rate), ("bd_psnr", bd_psnr)):
        try:
            deltas[key] = delta(*columns)
        except RDCurveError as err:
            deltas[key] = not_available(str(err))
    return deltas
