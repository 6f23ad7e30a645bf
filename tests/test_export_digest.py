"""Byte identity of a w12a12 export: the files the authors' engine and scripts read keep stored digests.

The model is built without training, and every float it holds is rounded to a coarse grid, so
the exported integers do not depend on the torch build or the thread count (a float sum that
rounds differently cannot cross a grid step); only a change of the export itself moves a digest.
Digests recorded on 2026-12-05 with the code of commit 85164e9 (the export that ran on the authors'
FPGA engine with 0 mismatches), before the layer-kind registry and the other refactors; the
same with 1 and 2 threads. Since per-layer widths the C header also lists each layer's widths: its C
arrays (digest computed with the code of main at 9e39212, before that change) and the header without those
width lines (the digest of 85164e9) are what stay byte-identical.
"""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from _models import TINY_MODEL, TINY_SPARSITY, photo
from streamlic import W12A12, StreamLIC
from streamlic.export import export_package

STORED = {
    "weights.txt": "89eba99e6f1f4af6f77dee5f67994b62f10b91f84bb11fdc69c08a154bdb7732",
    "scale_params.txt": "93785437c89512fdecde5e5358f1724fa3dc4cbb5c23b48ac6f45a2b8b226dcc",
    "scale_shifts.txt": "5d7855e4c209958edf52626795695075869904e6aae4ea338f11b504c3320853",
    "biases.txt": "58305a57bec0f3c4879183c3817721c9c739ccf395801f722e923f95d092abab",
    "streamlic_params.h (C arrays)": "7bc5899950eff13b9ee82c47b6dcc2b9cf029c8541f3fccab6b745636748a37a",
    "streamlic_params.h (without the per-layer widths)":
        "28adb37ae5eaec95f1e1d7151db0e2cdaeb72eb8186af0145d617b0ae63734c1",
    "params.pt (tensors)": "81e308e259dc9fc23e93f11e5fb5f28ca716b9b1e3f63a8d47a17fbc41f5cfe2",
}


def _coarse(t: torch.Tensor) -> torch.Tensor:
    """``t`` with 4 significant bits (zero stays zero)."""
    mantissa, exponent = torch.frexp(t.double())
    return torch.ldexp(torch.round(mantissa * 16) / 16, exponent).to(t.dtype)


def _coarse_model_state(model: StreamLIC) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(_coarse(tensor))


def _tensor_digest(params: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(params):
        for field in sorted(params[key]) if isinstance(params[key], dict) else [None]:
            value = params[key] if field is None else params[key][field]
            digest.update(f"{key}.{field}".encode())
            if isinstance(value, torch.Tensor):
                digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
                digest.update(value.contiguous().numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


def _c_arrays(text: str) -> list[str]:
    """The lines of the header's ``static const`` declarations (arrays with their values, scalars)."""
    kept, inside = [], False
    for line in text.splitlines():
        inside = inside or line.startswith("static const")
        if inside:
            kept.append(line)
            inside = not (line == "};" or (line.startswith("static const") and line.endswith(";")))
    return kept


def _without_layer_widths(text: str) -> str:
    """The header without the width lines per-layer widths added (the latent width, each layer's widths)."""
    added = re.compile(r"#define STREAMLIC_(LATENT_BITS|\w+_\d+_(ACT|WEIGHT|PRECISION|RESIDUAL)_BITS) ")
    return "".join(line for line in text.splitlines(keepends=True) if not added.match(line))


def export_digests(out_dir) -> dict[str, str]:
    torch.manual_seed(0)
    model = StreamLIC(model=TINY_MODEL, hardware=W12A12, sparsity=TINY_SPARSITY)
    _coarse_model_state(model)
    model.calibrate(photo("astronaut", 128, 128))  # ranges and input statistics, then rounded too
    _coarse_model_state(model)
    model.set_all_mask()
    model.toggle_mask(True)
    model.toggle_quantization(True)
    model.eval()
    export_package(model, out_dir)
    digests = {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest()
               for name in STORED if name.endswith(".txt")}
    header = (out_dir / "streamlic_params.h").read_text()
    digests["streamlic_params.h (C arrays)"] = hashlib.sha256("\n".join(_c_arrays(header)).encode()).hexdigest()
    digests["streamlic_params.h (without the per-layer widths)"] = hashlib.sha256(
        _without_layer_widths(header).encode()).hexdigest()
    digests["params.pt (tensors)"] = _tensor_digest(torch.load(out_dir / "params.pt", weights_only=False))
    return digests


def test_w12a12_export_keeps_its_stored_digests(tmp_path):
    assert export_digests(tmp_path) == STORED
