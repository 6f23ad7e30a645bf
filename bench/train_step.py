"""Milliseconds per training step in each of the five stages, ``set_all_mask`` time, peak memory.

    python bench/train_step.py [--device cpu|cuda] [--steps 3] [--model-size default|tiny]
                               [--compile] [--research PATH]

Each (batch, size) setting runs in a fresh process so its peak memory is its own. The step is
forward + rate-distortion loss + backward + Adam step, on crops of a real demo photo.
The functions take any model with StreamLIC's stage API (``enter_stage``), so another
implementation can be timed side by side with :func:`time_stages`.

``--compile`` adds a row where StreamLIC runs its forward and loss (and so their backward)
through the training module's ``torch.compile`` path (``module.compile=true``; on CUDA with
``mode="reduce-overhead"``: CUDA graphs); the first steps of each stage, which compile, are
timed apart and printed as compile time. ``--research PATH`` times the research code (a
folder with its ``StreamLIC_Q.py`` and ``qat_utils.py``, never committed)
in eager mode in the same run, driven through the same stages.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compiled_loss, eager_loss, enter_research_stage, load_research, photo_batch  # noqa: E402

from streamlic.stage import STAGES  # noqa: E402

SETTINGS = ((8, 256), (4, 128))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_stages(model, x: torch.Tensor, steps: int, warmup: int = 2, enter_stage=None,
                loss_of=eager_loss) -> dict[str, dict[str, float]]:
    """Per stage: ``ms`` per optimizer step and ``warmup_s``, the seconds of the first ``warmup`` steps
    (where a compiled model compiles). The model enters the stages in order through
    ``enter_stage(model, stage)`` (default: its ``enter_stage`` method); ``loss_of(model, x)``
    is the step's forward and loss."""
    device = x.device.type
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    result = {}
    for stage in STAGES:
        if enter_stage is None:
            model.enter_stage(stage)
        else:
            enter_stage(model, stage)
        start = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                warmup_s = time.perf_counter() - start
                start = time.perf_counter()
            loss = loss_of(model, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        result[stage] = {"ms": 1000 * (time.perf_counter() - start) / steps, "warmup_s": warmup_s}
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
    batch, size, device, steps, model_size, threads, compile_model = args
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
    loss_of = compiled_loss("reduce-overhead" if device == "cuda" else None) if compile_model else eager_loss
    stages = time_stages(model, x, steps, loss_of=loss_of)
    return {"name": "StreamLIC" + (" compiled" if compile_model else ""), "batch": batch, "size": size,
            "stages": stages, "set_all_mask_ms": mask_ms, "peak_mb": peak_memory_mb(device)}


def _run_research(args: tuple) -> dict:
    """The research code, eager, through the same stages (its prints silenced)."""
    batch, size, device, steps, threads, path = args

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = load_research(path)().to(device)
        stages = time_stages(model, photo_batch(batch, size, device), steps, enter_stage=enter_research_stage)
    return {"name": "research (eager)", "batch": batch, "size": size, "stages": stages,
            "set_all_mask_ms": float("nan"), "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model-size", choices=("default", "tiny"), default="default")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time StreamLIC's compiled training path")
    parser.add_argument("--research", help="folder with the research code's StreamLIC_Q.py and qat_utils.py")
    parser.add_argument("--settings", default=",".join(f"{b}x{s}" for b, s in SETTINGS),
                        help="comma-separated BATCHxSIZE settings")
    args = parser.parse_args()
    settings = [tuple(int(v) for v in item.split("x")) for item in args.settings.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for batch, size in settings:
        jobs = [(_run_setting, (batch, size, args.device, args.steps, args.model_size, args.threads, compiled))
                for compiled in ((False, True) if args.compile else (False,))]
        if args.research:
            jobs.append((_run_research, (batch, size, args.device, args.steps, args.threads, args.research)))
        for function, job in jobs:
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(function, (job,)))
    print(f"device: {args.device}, torch {torch.__version__}, threads {args.threads}, model {args.model_size}")
    print("| implementation | batch x size | " + " | ".join(f"{s} ms (img/s)" for s in STAGES)
          + " | set_all_mask ms | peak MB |")
    print("|" + "---|" * (len(STAGES) + 4))
    for row in rows:
        cells = " | ".join(f"{row['stages'][s]['ms']:.0f} ({1000 * row['batch'] / row['stages'][s]['ms']:.1f})"
                           for s in STAGES)
        print(f"| {row['name']} | {row['batch']} x {row['size']}² | {cells} | {row['set_all_mask_ms']:.2f} | "
              f"{row['peak_mb']:.0f} |")
    print("warm-up (compile) seconds of each stage's first 2 steps:")
    for row in rows:
        cells = ", ".join(f"{s} {row['stages'][s]['warmup_s']:.1f}" for s in STAGES)
        print(f"  {row['name']} {row['batch']} x {row['size']}²: {cells}")


if __name__ == "__main__":
    main()
