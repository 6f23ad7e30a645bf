"""The compiled training path (``module.compile=true``) computes the eager model's integers in every stage."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from _models import LAMBDA, tiny_model, training_batches

from streamlic.lightning_module import CompiledForward, forward_and_loss
from streamlic.stage import STAGES

# bench/gpu.sh runs this test on a GPU too (inductor's Triton backend)
DEVICE = os.environ.get("STREAMLIC_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor's CPU backend needs a C++ compiler")


def _step(step, model, x, seed: int = 1):
    """One training forward + backward under a fixed seed (the training noise); returns output and loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out, terms, clamped = step(model, x, x, LAMBDA, "mse")
    terms["loss"].backward()
    return out, terms["loss"].detach(), clamped


def _assert_same_integers(out_eager, out_compiled, quantized: bool) -> None:
    for key in ("y_symbols", "z_symbols", "pdf_index"):
        if out_eager[key] is not None:
            assert torch.equal(out_eager[key], out_compiled[key]), key
    if quantized:  # g_s's last layer outputs integers times its scale: the same integers, the same floats
        assert torch.equal(out_eager["x_hat"], out_compiled["x_hat"])
    else:
        torch.testing.assert_close(out_eager["x_hat"], out_compiled["x_hat"], rtol=0, atol=1e-5)


@pytest.fixture
def no_tf32():
    """TF32 off for the test, restored after it through the same public attributes.

    Not monkeypatch: on the CUDA wheel ``torch.backends.cuda.matmul`` serves ``allow_tf32`` from
    ``__getattr__``, which monkeypatch's undo cannot restore on every build.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("no_tf32")  # integer emulation never runs under TF32 (docs/fixed-point.md), as training sets it
def test_compiled_step_gives_the_eager_integers_in_every_stage_and_across_transitions():
    eager = tiny_model("w12a12", "aun").train().to(DEVICE)
    compiled = copy.deepcopy(eager)
    step = CompiledForward(forward_and_loss)
    x = training_batches(1, batch=2)[0].to(DEVICE)
    for stage in STAGES:
        for model in (eager, compiled):
            model.enter_stage(stage)
        out_eager, loss_eager, clamped_eager = _step(forward_and_loss, eager, x)
        out_compiled, loss_compiled, clamped_compiled = _step(step, compiled, x)
        _assert_same_integers(out_eager, out_compiled, eager.quantized)
        assert torch.equal(clamped_eager, clamped_compiled)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=0)
        trained = 0
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert (p.grad is None) == (q.grad is None), f"{stage}: {name}"
            if p.grad is not None:
                trained += 1
                # float gradients: the compiled graph sums in its own order (the rate's logs and sums
                # differ in the last bits), so they agree to ~1e-3 of their norm, not bit for bit
                error = float((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
                assert error < 1e-2, f"{stage}: gradient of {name} differs by {error:.2e} of its norm"
        assert trained > 0
        if stage == "pdf":  # the validation forward (stages 4 and 5 train through the row loop already)
            eager.eval(), compiled.eval()
            with torch.no_grad():
                out_eager, _, _ = forward_and_loss(eager, x, x, LAMBDA, "mse")
                out_compiled, _, _ = step(compiled, x, x, LAMBDA, "mse")
            _assert_same_integers(out_eager, out_compiled, quantized=True)
            eager.train(), compiled.train()
        # one eager Adam step, then the compiled model continues from the same state
        torch.optim.Adam([p for p in eager.parameters() if p.grad is not None], lr=1e-3).step()
        compiled.load_state_dict(eager.state_dict())
    assert step.compile_seconds > 0
