"""``streamlic eval``: rate-distortion of checkpoints on an image folder, CompressAI results files, RD plots."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..images import scan_folder
from ..metrics import ms_ssim
from ..rd import bd_deltas, curve_problem, not_available
from .bitstream import CodecError, StreamCodec
from .io import CodecSource, load_codec, load_image_file, to_uint8, write_atomically


def psnr_8bit(reference: Tensor, decoded: Tensor) -> float:
    """PSNR in dB of two images [3, H, W] after rounding both to 8 bits (as written to disk)."""
    mse = torch.mean((to_uint8(reference).double() - to_uint8(decoded).double()) ** 2)
    return float(10.0 * torch.log10(255.0**2 / mse)) if mse > 0 else math.inf


def ms_ssim_8bit(reference: Tensor, decoded: Tensor) -> float:
    """MS-SSIM (:func:`streamlic.metrics.ms_ssim`, the training metric) of the 8-bit images."""
    a = to_uint8(reference).float()[None] / 255.0
    b = to_uint8(decoded).float()[None] / 255.0
    return float(ms_ssim(b, a)[0])


def finite_mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def evaluate_images(codec: StreamCodec, images: Sequence[tuple[str, Tensor | Path]], progress: bool = True,
                    description: str = "eval") -> list[dict[str, Any]]:
    """Encode and decode each (name, image [3, H, W] or image file) through real bytes; one record each."""
    from tqdm import tqdm

    records = []
    for name, image in tqdm(images, desc=description, unit="image", disable=not progress):
        if not isinstance(image, Tensor):
            image = load_image_file(image)
        start = time.perf_counter()
        encoded = codec.encode(image)
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        decoded = codec.decode(encoded.data, name)
        decode_seconds = time.perf_counter() - start
        records.append({
            "name": name, "height": encoded.height, "width": encoded.width, "bytes": len(encoded.data),
            "bpp": encoded.bpp, "bpp-estimated": encoded.estimated_bpp,
            "psnr-rgb": _json_number(psnr_8bit(image, decoded)), "ms-ssim-rgb": ms_ssim_8bit(image, decoded),
            "encoding_time": encode_seconds, "decoding_time": decode_seconds,
        })
    return records


RESULT_METRICS = ("bpp", "bpp-estimated", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")


def _warm_up(codec: StreamCodec, image: Tensor | Path) -> None:
    """One untimed round trip: the first call pays one-time setup (allocator, kernels, tables)."""
    if not isinstance(image, Tensor):
        image = load_image_file(image)
    codec.decode(codec.encode(image).data, "warm-up")


def evaluate_folder(checkpoints: Sequence[CodecSource], folder: str | os.PathLike, name: str = "StreamLIC",
                    progress: bool = True) -> dict[str, Any]:
    """Rate-distortion results of one or more checkpoints on every image under ``folder``.

    Returns CompressAI's results format: ``results`` holds one value per checkpoint (the mean
    over the images) for each metric, so several checkpoints make an RD curve; ``per_image``
    holds the records behind each point. Unreadable images are reported and skipped.

    Metrics: ``bpp`` counts every byte of the file (header included) per original pixel;
    ``bpp-estimated`` is the ideal code length of the coded symbols under the 16-bit coding
    tables (``-log2(frequency / 2**16)``, the likelihoods stage 5 trains on); ``psnr-rgb`` and
    ``ms-ssim-rgb`` compare the 8-bit input with the 8-bit decoded image (MS-SSIM as in
    training: fewer scales on images too small for five); times are seconds of :meth:`StreamCodec.encode`
    and :meth:`StreamCodec.decode`, without reading or writing files, measured after one
    untimed round trip (as CompressAI's timings are); loading the checkpoint and that first
    round trip are ``setup_time`` of each ``per_image`` entry.
    """
    paths = scan_folder(folder)
    if not paths:
        raise CodecError(f"{folder}: no readable images")
    root = Path(folder)
    images = [(str(path.relative_to(root)), path) for path in paths]
    results: dict[str, list] = {metric: [] for metric in RESULT_METRICS}
    per_image = []
    for source in checkpoints:
        label = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
        start = time.perf_counter()
        codec = load_codec(source)
        _warm_up(codec, images[0][1])
        setup_seconds = time.perf_counter() - start
        records = evaluate_images(codec, images, progress, description=f"eval {Path(str(label)).name}")
        for metric in RESULT_METRICS:
            results[metric].append(finite_mean([record[metric] for record in records]))
        per_image.append({"checkpoint": str(label), "setup_time": setup_seconds, "images": records})
    return {
        "name": name,
        "description": f"StreamLIC, exact integer decoder, rANS with 16-bit tables; {len(images)} images in {root}",
        "results": results,
        "per_image": per_image,
    }


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A CompressAI-format results file (``name``, ``results.bpp``, ``results.psnr-rgb`` ...)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
        bpp = results["results"]["bpp"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CodecError(f"{path}: not a CompressAI results file ({err})") from err
    if not isinstance(bpp, list):
        raise CodecError(f"{path}: results.bpp must be a list")
    results.setdefault("name", path.stem)
    return results


def curve_points(results: dict[str, Any], metric: str = "psnr") -> list[tuple[float, float]]:
    """``(bpp, metric)`` points of a CompressAI-format results dict, by rate, skipping missing values.

    Older CompressAI results files name the metrics without the ``-rgb`` suffix.
    """
    values = results.get(f"{metric}-rgb", results.get(metric, []))
    return sorted((float(bpp), float(value)) for bpp, value in zip(results["bpp"], values)
                  if bpp is not None and value is not None)


def curve_check(results: dict[str, Any]) -> str:
    """``"usable"``, or ``"n/a: <reason>"`` when the PSNR curve gives no BD-rate (:func:`streamlic.rd.curve_problem`).

    The points of a results file carry no λ: the check is on the points alone (PSNR rising
    with rate, four points, the rate span).
    """
    problem = curve_problem(curve_points(results["results"]))
    return "usable" if problem is None else not_available(problem)


def bd_rate_against(results: dict[str, Any], anchor: dict[str, Any]) -> dict[str, Any]:
    """BD-rate (percent) and BD-PSNR (dB) of ``results``' PSNR curve against ``anchor``'s.

    Returns ``{"anchor", "anchor_curve", "bd_rate", "bd_psnr"}``: the anchor curve's check
    (:func:`curve_check`) and the deltas of :func:`streamlic.rd.bd_deltas`, where one the
    curves do not have is the text ``"n/a: <reason>"``.
    """
    return {"anchor": anchor["name"], "anchor_curve": curve_check(anchor),
            **bd_deltas(curve_points(anchor["results"]), curve_points(results["results"]))}


def compare(results: dict[str, Any], anchors: Sequence[dict[str, Any]]) -> list[str]:
    """Record in ``results`` its curve check and its BD-rates against each anchor; the lines that say them.

    ``results["curve_check"]`` and ``results["bd_rate"]`` (one :func:`bd_rate_against` entry per
    anchor) travel in the results JSON; CompressAI's readers ignore the extra keys.
    """
    results["curve_check"] = curve_check(results)
    results["bd_rate"] = [bd_rate_against(results, anchor) for anchor in anchors]
    lines = [f"RD curve of {results['name']}: {results['curve_check']}"]
    for entry in results["bd_rate"]:
        rate, psnr = (value if isinstance(value, str) else f"{value:{fmt}}{unit}"
                      for value, fmt, unit in ((entry["bd_rate"], "+.2f", " %"), (entry["bd_psnr"], "+.3f", " dB")))
        lines += [f"RD curve of {entry['anchor']}: {entry['anchor_curve']}",
                  f"BD-rate of {results['name']} against {entry['anchor']}: {rate}; BD-PSNR: {psnr}"]
    return lines


def plot_rd(curves: Sequence[dict[str, Any]], path: str | os.PathLike, force: bool = False) -> None:
    """PSNR and MS-SSIM (dB) against bpp for CompressAI-format results, one line each.

    MS-SSIM is drawn as ``-10 log10(1 - MS-SSIM)``, as in CompressAI's plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (psnr_axis, msssim_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for curve in curves:
        results = curve["results"]
        for axis, metric, transform in ((psnr_axis, "psnr", float),
                                        (msssim_axis, "ms-ssim", lambda v: -10.0 * math.log10(1.0 - v))):
            points = [(bpp, transform(value)) for bpp, value in curve_points(results, metric)
                      if metric != "ms-ssim" or value < 1]
            if points:
                axis.plot(*zip(*points), marker="o", label=curve["name"])
    for axis, label in ((psnr_axis, "PSNR RGB [dB]"), (msssim_axis, "MS-SSIM RGB [dB]")):
        axis.set_xlabel("bits per pixel")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.4)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    output = Path(path)
    write_atomically(output, lambda f: figure.savefig(f, format="png", dpi=120), force)
    plt.close(figure)
