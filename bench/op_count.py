"""Compute ops and host syncs dispatched by one training step, per stage.

    python bench/op_count.py [--batch 2] [--size 128] [--research PATH] [--compile] [--top 12]

On a GPU the training step is launch-bound, so its cost is the number of kernels it launches.
That number is measured here on any machine: a ``TorchDispatchMode`` counts every ATen op
dispatched during one step (forward, rate-distortion loss, backward, Adam step), leaving out
views, metadata-only ops and bare allocations (they launch no kernel). Host syncs are the
ops that read a tensor's value on the host (``aten._local_scalar_dense``: ``.item()``,
``bool(t)``, ``if t:``) plus ``Tensor.tolist`` / ``Tensor.numpy`` calls, counted in the model's
forward, loss and backward (Adam reads its step counters, which stay on the host on a GPU too).
Adam runs its ``foreach`` implementation, the GPU default (``--no-foreach``: the per-parameter
loop torch picks on a CPU).

``--compile`` also counts the compiled training path (``module.compile=true``): the kernels
inductor generated for the step's graphs (each launched once per step) plus the ATen ops the
step still runs (library calls such as convolutions, the optimizer), from a profiler trace.

``--research PATH`` counts the public research implementation side by side: PATH is a folder
holding its ``StreamLIC_Q.py`` and ``qat_utils.py`` (kept outside this repository). Both
models are driven through the same five stages by their own stage APIs, with the same
photos, loss and optimizer; one warm-up step per stage precedes the counted step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compiled_loss, eager_loss, enter_research_stage, load_research, photo_batch  # noqa: E402

from streamlic.stage import STAGES  # noqa: E402

aten = torch.ops.aten
# ops that only describe or allocate memory: no kernel runs for them
NO_KERNEL = {aten.detach, aten.alias, aten._unsafe_view, aten.lift_fresh, aten.empty, aten.empty_like,
             aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.set_, aten.resize_}
HOST_SYNC = {aten._local_scalar_dense}


class OpCounter(TorchDispatchMode):
    """Counts dispatched compute ops by name, and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_syncs = 0
        self.counting_syncs = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in HOST_SYNC:
            self.host_syncs += self.counting_syncs
        elif not (func.is_view or packet in NO_KERNEL):
            self.ops[packet.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting_host_reads(self):
        """Also count ``tolist``/``numpy`` (host reads that dispatch no op)."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def wrap(original):
            def read(tensor, *args, **kwargs):
                self.host_syncs += self.counting_syncs
                return original(tensor, *args, **kwargs)
            return read

        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def training_step(model, x: torch.Tensor, optimizer: torch.optim.Optimizer, counter: OpCounter | None = None,
                  loss_of=eager_loss) -> None:
    """The step of ``bench/train_step.py``: forward, RD loss, backward, Adam (whose syncs ``counter`` skips)."""
    loss = loss_of(model, x)
    optimizer.zero_grad()
    loss.backward()
    if counter is not None:
        counter.counting_syncs = False
    optimizer.step()


def count_step(model, x: torch.Tensor, optimizer, step=training_step) -> OpCounter:
    counter = OpCounter()
    with counter, counter.counting_host_reads():
        step(model, x, optimizer, counter)
    return counter


def count_stages(model, x: torch.Tensor, enter_stage, warmup: int = 1, foreach: bool = True,
                 step=training_step, counting=count_step) -> dict[str, OpCounter]:
    """One counted step per stage after ``warmup`` steps; ``enter_stage(model, stage)`` switches stages."""
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    optimizer = torch.optim.Adam(params, lr=1e-5, foreach=foreach)
    counts = {}
    for stage in STAGES:
        enter_stage(model, stage)
        for _ in range(warmup):
            step(model, x, optimizer)
        counts[stage] = counting(model, x, optimizer, step)
    return counts


# ------------------------------------------------------------------ the compiled path

# ATen ops that launch no kernel by themselves (views, allocation, dtype/layout no-ops)
PROFILED_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "as_strided",
                      "as_strided_", "view", "_unsafe_view", "reshape", "_reshape_alias", "detach", "alias", "expand",
                      "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "permute", "lift_fresh", "split",
                      "split_with_sizes", "chunk", "unbind", "narrow", "to", "contiguous", "view_as", "expand_as",
                      "flatten", "unflatten", "set_", "_local_scalar_dense", "item", "zero_"}


def count_compiled_step(model, x: torch.Tensor, optimizer, step) -> OpCounter:
    """Kernels launched by one compiled step: those inductor generated for the graphs the step runs
    (each launched once per run) plus the ATen ops run outside them or as their library calls
    (convolutions, matmuls, the optimizer), read from a profiler trace.

    A dispatch mode cannot observe a compiled graph (it would run eagerly), hence the profiler.
    """
    from torch._inductor import metrics
    from torch.profiler import ProfilerActivity, profile

    before = metrics.generated_kernel_count
    counter = OpCounter()
    with counter.counting_host_reads(), profile(activities=[ProfilerActivity.CPU]) as trace:
        step(model, x, optimizer)
    if metrics.generated_kernel_count != before:
        raise RuntimeError("the counted compiled step compiled again: raise --warmup")
    counter.ops["inductor kernels"] = model.compiled_kernels

    def launches(event) -> bool:
        name = event.name.removeprefix("aten::")
        return name not in PROFILED_NO_KERNEL or any(launches(child) for child in event.cpu_children
                                                     if child.name.startswith("aten::"))

    def in_optimizer(event) -> bool:
        while event is not None:
            if event.name.startswith("Optimizer.step"):
                return True
            event = event.cpu_parent
        return False

    for event in trace.events():
        parent = event.cpu_parent
        if event.name == "aten::_local_scalar_dense" and not in_optimizer(event):
            counter.host_syncs += 1
        if event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            if launches(event):
                counter.ops[event.name.removeprefix("aten::")] += 1
    return counter


def compiled_stages(x: torch.Tensor, foreach: bool) -> dict[str, OpCounter]:
    """Kernels per step of the compiled training path (``module.compile=true``) in every stage."""
    from torch._inductor import metrics

    from streamlic import StreamLIC

    loss_of = compiled_loss()

    def step(model, x, optimizer, counter=None):
        before = metrics.generated_kernel_count
        training_step(model, x, optimizer, counter, loss_of=loss_of)
        if metrics.generated_kernel_count != before:  # this step compiled: the kernels of its graphs
            model.compiled_kernels = metrics.generated_kernel_count - before

    torch.manual_seed(0)
    return count_stages(StreamLIC(), x, enter_our_stage, warmup=2, foreach=foreach, step=step,
                        counting=count_compiled_step)


# ------------------------------------------------------------------ the research code

def quiet_step(model, x, optimizer, counter=None) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        training_step(model, x, optimizer, counter)


def enter_our_stage(model, stage: str) -> None:
    model.enter_stage(stage)


# ------------------------------------------------------------------ report

def measure(args) -> dict[str, dict[str, OpCounter]]:
    from streamlic import StreamLIC

    torch.manual_seed(0)
    x = photo_batch(args.batch, args.size, "cpu")
    results = {}
    if args.research:
        research_class = load_research(args.research)
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            research = research_class()
        results["research"] = count_stages(research, x, enter_research_stage, foreach=args.foreach, step=quiet_step)
    torch.manual_seed(0)
    results["StreamLIC"] = count_stages(StreamLIC(), x, enter_our_stage, foreach=args.foreach)
    if args.compile:
        results["StreamLIC compiled"] = compiled_stages(x, args.foreach)
    return results


def print_report(results: dict[str, dict[str, OpCounter]], args) -> None:
    adam = "Adam foreach" if args.foreach else "Adam for-loop"
    print(f"one training step, default model, batch {args.batch} x {args.size}², {adam}, torch {torch.__version__}")
    print("| implementation | " + " | ".join(STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for name, counts in results.items():
        unit = "kernels" if name.endswith("compiled") else "ops"
        cells = " | ".join(f"{sum(counts[s].ops.values())} {unit}, {counts[s].host_syncs} syncs" for s in STAGES)
        print(f"| {name} | {cells} |")
    if "research" in results:
        theirs = results["research"]
        for name in ("StreamLIC", "StreamLIC compiled"):
            if name in results:
                ours = results[name]
                ratios = " | ".join(f"{sum(ours[s].ops.values()) / sum(theirs[s].ops.values()):.2f}x" for s in STAGES)
                print(f"| {name} / research | {ratios} |")
    for name, counts in results.items():
        for stage in STAGES:
            top = ", ".join(f"{op} {n}" for op, n in counts[stage].ops.most_common(args.top))
            print(f"{name} {stage}: {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--research", help="folder with the research code's StreamLIC_Q.py and qat_utils.py")
    parser.add_argument("--foreach", action=argparse.BooleanOptionalAction, default=True,
                        help="Adam's foreach implementation (the GPU default)")
    parser.add_argument("--compile", action="store_true",
                        help="also count the compiled training path (module.compile=true): minutes of compiling")
    parser.add_argument("--top", type=int, default=10, help="most frequent ops listed per stage")
    args = parser.parse_args()
    print_report(measure(args), args)


if __name__ == "__main__":
    main()
