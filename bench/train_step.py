"""Milliseconds per training step in each of the five stages, ``set_all_mask`` time, peak memory.

    python bench/train_step.py [--device cpu|cuda] [--steps 3] [--model-size default|tiny]

Each (batch, size) setting runs in a fresh process so its peak memory is its own. The step is
forward + rate-distortion loss + backward + Adam step, on crops of a real demo photo.
The functions take any model with StreamLIC's stage API (``enter_stage``), so another
implementation can be timed side by side with :func:`time_stages`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from streamlic.stage import STAGES

SETTINGS = ((8, 256), (4, 128))


def photo_batch(batch: int, size: int, device: str) -> torch.Tensor:
    from streamlic.images import demo_images

    crops = []
    images = [image for _, image in demo_images("train")]
    for i in range(batch):
        image = images[i % len(images)]
        _, h, w = image.shape
        top, left = (i * 37) % (h - size), (i * 53) % (w - size)
        crops.append(image[:, top:top + size, left:left + size])
    return torch.stack(crops).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_stages(model, x: torch.Tensor, steps: int, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per optimizer step in each stage (the model enters the stages in order)."""
    device = x.device.type
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    result = {}
    for stage in STAGES:
        model.enter_stage(stage)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                start = time.perf_counter()
            out = model(x)
            bpp = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values()) / pixels
            loss = bpp + 0.01 * 255**2 * torch.mean((out["x_hat"] - x) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        result[stage] = 1000 * (time.perf_counter() - start) / steps
    return result


def time_set_all_mask(model, repeats: int = 20) -> float:
    """Milliseconds for ``set_all_mask`` (forced recomputation) on a model with statistics."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if hasattr(model, "masks_set"):
            model.set_all_mask(force=True)
        else:
            model.set_all_mask()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_setting(args: tuple) -> dict:
    batch, size, device, steps, model_size, threads = args
    from streamlic import StreamLIC

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tiny = {"c1": 12, "c2": 12, "c3": 24, "M": 24, "N": 12}
    model = StreamLIC(model=tiny if model_size == "tiny" else None).to(device)
    x = photo_batch(batch, size, device)
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    mask_model = StreamLIC(model=tiny if model_size == "tiny" else None).to(device)
    with torch.no_grad():
        mask_model.train()
        mask_model(x[:1, :, :64, :64])
    mask_ms = time_set_all_mask(mask_model)
    stages = time_stages(model, x, steps)
    return {"batch": batch, "size": size, "stages": stages, "set_all_mask_ms": mask_ms,
            "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model-size", choices=("default", "tiny"), default="default")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for batch, size in SETTINGS:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_run_setting, ((batch, size, args.device, args.steps, args.model_size,
                                                   args.threads),)))
    header = "| batch x size | " + " | ".join(f"{s} ms" for s in STAGES) + " | set_all_mask ms | peak MB |"
    print(f"device: {args.device}, torch {torch.__version__}, threads {args.threads}, model {args.model_size}")
    print(header)
    print("|" + "---|" * (len(STAGES) + 3))
    for row in rows:
        cells = " | ".join(f"{row['stages'][s]:.0f}" for s in STAGES)
        print(f"| {row['batch']} x {row['size']}² | {cells} | {row['set_all_mask_ms']:.2f} | {row['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
