"""Multi-process training: a DDP strategy that survives stage changes, and buffer reductions.

Two things differ from plain Lightning DDP:

* ``torch.nn.parallel.DistributedDataParallel`` registers, once, the parameters that
  require a gradient when it wraps the model. StreamLIC switches trainability per stage
  (stage 5 trains the probability tables, frozen until then), so
  :class:`StageAwareDDPStrategy` registers every parameter and lets DDP find the unused
  ones in each step. A parameter unused on every rank keeps ``grad=None``, so Adam leaves
  it alone, exactly as in single-process training.
* Statistics gathered in buffers (input moments of the sparse layers, activation ranges)
  must agree on every rank before masks are cut and scales are frozen: the helpers below
  reduce them explicitly (mean for moments, max for ranges).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from .layers import QuantLayer
from .model import StreamLIC


class StageAwareDDPStrategy(DDPStrategy):
    """Lightning's DDP with every parameter registered and unused ones detected per step."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["find_unused_parameters"] = True  # frozen stages leave parameters unused
        super().__init__(*args, **kwargs)

    def _setup_model(self, model: nn.Module):
        trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        for parameter, _ in trainable:
            parameter.requires_grad_(True)
        try:
            return super()._setup_model(model)
        finally:
            for parameter, flag in trainable:
                parameter.requires_grad_(flag)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def average_sparse_statistics(model: StreamLIC) -> bool:
    """Average the sparse layers' input moments over all ranks; True if a reduction ran."""
    world = _world_size()
    if world == 1:
        return False
    for layer in model.sparse_layers().values():
        for buffer in (layer.in_mean, layer.in_sqmean):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
    return True


@torch.no_grad()
def max_activation_ranges(model: StreamLIC) -> bool:
    """Take the largest running activation range of every layer over all ranks; True if a reduction ran."""
    if _world_size() == 1:
        return False
    for module in model.modules():
        if isinstance(module, QuantLayer) and module.fixed_scale is None:
            dist.all_reduce(module.act_absmax, op=dist.ReduceOp.MAX)
    return True
