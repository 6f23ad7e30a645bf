"""Multi-process training: a DDP strategy that survives stage changes.

``torch.nn.parallel.DistributedDataParallel`` registers, once, the parameters that require
a gradient when it wraps the model. StreamLIC switches trainability per stage (stage 5
trains the probability tables, frozen until then), so :class:`StageAwareDDPStrategy`
registers every parameter and lets DDP find the unused ones in each step. A parameter
unused on every rank keeps ``grad=None``, so Adam leaves it alone, exactly as in
single-process training.

The running statistics (activation ranges, sparse-layer input moments), which DDP does not
keep in step, are reduced over the ranks in every training step by the layers themselves
(``layers.quant.reduce_over_ranks``), so every rank cuts the same masks and freezes the same scales.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy
from torch import nn


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

