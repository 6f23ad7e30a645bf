"""Seconds of the integer reference model on a 768x512 photo: whole network and the row engine alone,
with the block-sparse context layers evaluated densely (masked convolution) and sparsely (active
blocks only).

    python bench/integer_model.py [--repeats 3] [--threads N] [--model-size default|tiny]

The model has the default sizes (M = 192, context densities 18.75 / 9.4 / 12.5 %) with random
weights taken through the stage API (ranges tracked on demo crops, masks set, QAT on): timing
does not depend on what the weights learned. Times are the best of ``--repeats`` runs (three
times as many for the row engine alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from streamlic import StreamLIC
from streamlic.images import demo_images
from streamlic.export.report import hardware_report
from streamlic.integer_model import IntegerModel
from streamlic.params import export_quantized_parameters

PHOTO = "hubble_deep_field"  # 872 x 1000: the only demo photo with a 512 x 768 centre crop that is all image
HEIGHT, WIDTH = 512, 768
TINY = dict(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"))


def photo() -> torch.Tensor:
    image = dict(demo_images())[PHOTO]
    top, left = (image.shape[1] - HEIGHT) // 2, (image.shape[2] - WIDTH) // 2
    return image[None, :, top:top + HEIGHT, left:left + WIDTH].contiguous()


def quantized_model(model_cfg: dict | None) -> StreamLIC:
    """A model at stage 3: activation ranges and input statistics from a few training-mode passes."""
    torch.manual_seed(0)
    model = StreamLIC(model=model_cfg)
    for _, image in demo_images("train")[:4]:
        model.calibrate(image[None, :, :256, :256])
    model.enter_stage("mask")
    model.enter_stage("qat")
    return model.eval()


def best_times(repeats: int, fns: dict) -> dict:
    """Best time of each function over ``repeats`` rounds; the functions alternate within a round,
    so a slow spell of the machine does not favour one of them."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model-size", choices=("default", "tiny"), default="default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = quantized_model(None if args.model_size == "default" else TINY)
    params = export_quantized_parameters(model)
    engines = {mode: IntegerModel.from_model(model, context_engine=mode, params=params) for mode in ("dense", "sparse")}
    x = photo()
    blocks = {short: layer.blocks_per_group for short, layer in model.sparse_layers().items()}
    totals = hardware_report(params, model.hw, model.model_cfg, blocks, HEIGHT, WIDTH)["totals"]

    sparse = engines["sparse"]
    y_q, z_hat = sparse.analysis(x)
    params_q = sparse.hyper_synthesis(z_hat)
    whole = best_times(args.repeats, {mode: (lambda e=engine: e.forward(x)) for mode, engine in engines.items()})
    rows = best_times(3 * args.repeats,
                      {mode: (lambda e=engine: e.encode_rows(y_q, params_q)) for mode, engine in engines.items()})
    results = {mode: (whole[mode], rows[mode]) for mode in engines}
    assert torch.equal(engines["dense"].encode_rows(y_q, params_q)["symbols"],
                       engines["sparse"].encode_rows(y_q, params_q)["symbols"])

    cfg = model.model_cfg
    print(f"integer model, {HEIGHT}x{WIDTH} photo ({PHOTO}), model c1/c2/c3/M/N = "
          f"{cfg.c1}/{cfg.c2}/{cfg.c3}/{cfg.M}/{cfg.N}, {model.hw.name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} (row engine: {3 * args.repeats})")
    print()
    print("| context layers | whole network (s) | row engine alone (s) | row-engine MACs |")
    print("|---|---|---|---|")
    macs = {"dense": totals["context_macs_dense"], "sparse": totals["context_macs_sparse"]}
    for mode, (whole, rows) in results.items():
        print(f"| {mode} | {whole:.2f} | {rows:.3f} | {macs[mode] / 1e6:.0f} M |")
    ratio_time = results["sparse"][1] / results["dense"][1]
    print()
    print(f"row engine sparse/dense: time {ratio_time:.3f}, MACs {totals['context_sparse_ratio']:.3f}; "
          f"{y_q.shape[2]} sequential rows of {y_q.shape[3]} latents")


if __name__ == "__main__":
    main()
