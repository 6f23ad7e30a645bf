"""Encode and decode seconds of StreamLIC's codec against CompressAI's mbt2018 and bmshj2018.

    python bench/codec.py [--repeats 3] [--mbt-repeats 1] [--threads N] [--photo rocket] [--size 512x768]

All codecs code the same real photo (a demo photo resized to the given height x width) on
the same machine in one run, through real bitstreams:

- StreamLIC, default size (c 48/96/192, M 192, N 96), random weights taken through the
  stages to QAT (ranges tracked on the photo, masks set, scales frozen). Encoding and
  decoding run the exact integer model (the path whose output equals
  ``IntegerModel.synthesis`` bit for bit, which the script checks); decoding takes H/16
  row steps.
- ``mbt2018``: ``JointAutoregressiveHierarchicalPriors(N=192, M=192)``, whose
  ``compress``/``decompress`` visit the latent pixels one by one.
- ``bmshj2018-hyperprior``: ``ScaleHyperprior(N=128, M=192)`` (no context model).

CompressAI's models run in float32 with random weights (``update()`` builds their tables);
random weights change the bytes, not the work. Each time is the fastest of the repeats, in
wall-clock seconds, with the same number of torch threads for every codec. On a machine that
other processes share, ``--threads 1`` gives the steadiest numbers: with more threads every
small op of a per-pixel (mbt2018) or per-row loop waits for workers that may be descheduled.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from streamlic import StreamLIC
from streamlic.codec import StreamCodec
from streamlic.images import demo_images
from streamlic.integer_model import IntegerModel

GOALS = {"decode": 10.0, "encode": 3.0}  # StreamLIC's speed-up over mbt2018 (issue 5)


def bench_photo(name: str, height: int, width: int) -> torch.Tensor:
    photos = dict(demo_images())
    if name not in photos:
        raise SystemExit(f"unknown demo photo {name!r}; choose one of {sorted(photos)}")
    image = F.interpolate(photos[name][None], size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)
    return image.clamp(0.0, 1.0)


def streamlic_at_qat(x: torch.Tensor, seed: int = 0) -> StreamLIC:
    """Default-size StreamLIC with random weights, taken through the stage API to QAT."""
    torch.manual_seed(seed)
    model = StreamLIC()
    model.calibrate(x, passes=3)
    model.enter_stage("mask")
    model.enter_stage("qat")
    return model.eval()


def fastest(run: Callable[[], object], repeats: int) -> tuple[tuple[float, float], object]:
    """((wall seconds, process CPU seconds) of the fastest run, its result)."""
    best, result = (float("inf"), float("inf")), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best, result


def time_streamlic(x: torch.Tensor, repeats: int) -> dict[str, float]:
    codec = StreamCodec(IntegerModel.from_model(streamlic_at_qat(x)))
    image = x[0]
    encode_s, encoded = fastest(lambda: codec.encode(image), repeats)
    decode_s, decoded = fastest(lambda: codec.decode(encoded.data), repeats)
    expected = codec.engine.synthesis(encoded.code.y_hat_q)[0, :, :image.shape[1], :image.shape[2]]
    if not torch.equal(decoded, expected):
        raise SystemExit("StreamLIC's decoded image differs from the integer model's reconstruction")
    rows_s, (_, code) = fastest(lambda: codec.read_latents(encoded.data), repeats)
    synthesis_s, _ = fastest(lambda: codec.reconstruct(code), repeats)
    return {"encode": encode_s, "decode": decode_s, "bytes": len(encoded.data), "rows": rows_s[0],
            "synthesis": synthesis_s[0], "row_steps": code.symbols.shape[2]}


def time_compressai(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    model.eval()
    model.update(force=True)
    with torch.no_grad():
        encode_s, out = fastest(lambda: model.compress(x), repeats)
        decode_s, _ = fastest(lambda: model.decompress(out["strings"], out["shape"]), repeats)
    size = sum(len(s) for strings in out["strings"] for s in strings)
    return {"encode": encode_s, "decode": decode_s, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of StreamLIC and bmshj2018 (fastest counts)")
    parser.add_argument("--mbt-repeats", type=int, default=1, help="runs of mbt2018 (tens of seconds each)")
    parser.add_argument("--photo", default="rocket", help="demo photo to resize")
    parser.add_argument("--size", default="512x768", help="height x width")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    from compressai.models import JointAutoregressiveHierarchicalPriors, ScaleHyperprior

    x = bench_photo(args.photo, height, width)
    torch.manual_seed(0)
    results = {
        "StreamLIC (exact integer)": time_streamlic(x, args.repeats),
        "bmshj2018-hyperprior": time_compressai(ScaleHyperprior(N=128, M=192), x, args.repeats),
        "mbt2018": time_compressai(JointAutoregressiveHierarchicalPriors(N=192, M=192), x, args.mbt_repeats),
    }
    mbt = results["mbt2018"]
    print(f"\n{args.photo} resized to {width}x{height}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); seconds are wall clock (CPU time of the process in brackets)")
    print(f"{'codec':27s} {'encode s':>13s} {'decode s':>13s} {'bytes':>7s} {'enc vs mbt':>11s} {'dec vs mbt':>11s}")
    for name, r in results.items():
        (enc_wall, enc_cpu), (dec_wall, dec_cpu) = r["encode"], r["decode"]
        print(f"{name:27s} {enc_wall:6.2f} ({enc_cpu:5.2f}) {dec_wall:6.2f} ({dec_cpu:5.2f}) {r['bytes']:7d} "
              f"{mbt['encode'][0] / enc_wall:10.1f}x {mbt['decode'][0] / dec_wall:10.1f}x")
    ours = results["StreamLIC (exact integer)"]
    print(f"\nStreamLIC decode: {ours['rows']:.2f} s to read the latents (z stream, hyper synthesis, "
          f"{ours['row_steps']} row steps with rANS), {ours['synthesis']:.2f} s exact synthesis")
    for what, goal in GOALS.items():
        wall, cpu = (mbt[what][i] / ours[what][i] for i in range(2))
        verdict = "met" if min(wall, cpu) >= goal else "NOT met"
        print(f"{what}: {wall:.1f}x faster than mbt2018 ({cpu:.1f}x in CPU time), goal {goal:g}x: {verdict}")


if __name__ == "__main__":
    main()
