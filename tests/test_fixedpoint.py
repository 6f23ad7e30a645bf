"""The fixed-point rules of docs/fixed-point.md, checked against plain Python integer arithmetic."""

import math
import random

import pytest
import torch

from streamlic import W8A8, W12A12
from streamlic import fixedpoint as fxp


def test_rshift_round_and_shift_floor_match_python_integer_shifts():
    rng = random.Random(0)
    values = [rng.randint(-(2**40), 2**40) for _ in range(2000)] + [-33, -32, -31, -1, 0, 1, 31, 32, 33]
    v = torch.tensor(values, dtype=torch.float64)
    for r in (1, 4, 6, 13):
        expected = torch.tensor([(x + (1 << (r - 1))) >> r for x in values], dtype=torch.float64)
        assert torch.equal(fxp.rshift_round(v, r), expected)
        assert torch.equal(fxp.shift_floor(v, r), torch.tensor([x >> r for x in values], dtype=torch.float64))
    k = torch.tensor([rng.randint(0, 40) for _ in values], dtype=torch.float64)
    expected = torch.tensor([x >> int(s) for x, s in zip(values, k)], dtype=torch.float64)
    assert torch.equal(fxp.shift_floor(v, k), expected)


def test_rshift_round_ties_go_up():
    v = torch.tensor([-24.0, -8.0, 8.0, 24.0], dtype=torch.float64)  # exact halves at r = 4
    assert fxp.rshift_round(v, 4).tolist() == [-1.0, 0.0, 1.0, 2.0]


def test_to_multiplier_takes_the_largest_shift_and_16_bit_multiplier():
    factors = torch.tensor([1e-9, 3.3e-5, 0.5, 1.0, 3.0, 1234.5, 65534.0], dtype=torch.float64)
    m, k = fxp.to_multiplier(factors, W12A12, "layer")
    for f, mi, ki in zip(factors.tolist(), m.tolist(), k.tolist()):
        assert 0 <= ki <= 63 and mi < 2**16
        assert f * 2**ki < 65535
        assert ki == 63 or f * 2 ** (ki + 1) >= 65535  # no larger shift fits
        assert mi == round(f * 2**ki)
        assert abs(mi / 2**ki - f) <= 0.5 / 2**ki


@pytest.mark.parametrize("bad", [0.0, -1.0, 65535.0, 1e6, float("nan")])
def test_to_multiplier_rejects_out_of_range_factors_naming_the_layer(bad):
    with pytest.raises(fxp.FixedPointError, match="g_a.2"):
        fxp.to_multiplier(torch.tensor([0.5, bad]), W12A12, "g_a.2")


def test_requantize_matches_an_integer_reference():
    rng = random.Random(1)
    hw = W12A12
    r = hw.residual_bits
    for _ in range(500):
        acc = rng.randint(-(2**33), 2**33)
        m = rng.randint(1, 65535)
        k = rng.randint(0, 40)
        b = rng.randint(-(2**15), 2**15)
        v = ((acc * m) >> k) + b
        expected = max(-2047, min(2047, (v + (1 << (r - 1))) >> r))
        got = fxp.requantize(torch.tensor([float(acc)], dtype=torch.float64), torch.tensor([float(m)], dtype=torch.float64),
                             torch.tensor([float(k)], dtype=torch.float64), torch.tensor([float(b)], dtype=torch.float64),
                             hw)
        assert got.item() == expected


def test_leaky_relu_on_integers():
    values = list(range(-300, 300))
    got = fxp.leaky_relu(torch.tensor(values, dtype=torch.float64)).tolist()
    assert got == [v if v >= 0 else (v + 32) >> 6 for v in values]


@pytest.mark.parametrize("hw", [W12A12, W8A8], ids=["w12a12", "w8a8"])
def test_tanh_table(hw):
    table = fxp.tanh_table(hw)
    assert table.numel() == 2 * hw.act_max + 1
    for i in (-hw.act_max, -300, -1, 0, 1, 77, hw.act_max):
        expected = round(math.tanh(i / 2 ** (hw.activation_bits - 4)) * 2 ** (hw.activation_bits - 2))
        assert table[i + hw.act_max].item() == expected
    assert table.abs().max().item() <= hw.act_max


def test_image_input_of_8_bit_pixels_is_2p_minus_255():
    p = torch.arange(256, dtype=torch.float64)
    assert torch.equal(fxp.quantize_image(p / 255, W12A12), 2 * p - 255)
    assert fxp.image_scale(W12A12) == 1 / 510
    assert fxp.quantize_image(torch.tensor([0.0, 1.0]), W8A8).tolist() == [-127, 127]


def test_latent_and_hyper_symbol_rules():
    hw = W12A12
    z = torch.tensor([-5000.0, -8.0, -9.0, 7.0, 8.0, 5000.0])
    assert fxp.hyper_symbols(z, hw).tolist() == [-127, 0, -1, 0, 1, 127]
    y = torch.tensor([2032.0, -2032.0, 40.0])
    mu = torch.tensor([-2047.0, 2047.0, 8.0])
    s = fxp.latent_symbols(y, mu, hw)
    assert s.tolist() == [127, -127, 2]
    assert fxp.dequantize_latent(s, mu, hw).tolist() == [-15.0, 15.0, 40.0]
    assert fxp.clamp_latent(torch.tensor([5000.0]), hw).item() == 127 * 16
    assert fxp.clamp_latent(torch.tensor([5000.0]), W8A8).item() == 127


def test_scale_index_fold_reproduces_the_index_rule():
    # v = 2 log2 sigma at scale 1/16: index = (16 v + 111) / 3 = q / 3 + 37
    hw = W12A12
    factor = torch.tensor([16.0])  # 2**r * s_in * s_w / s_out with all scales folded to 1
    folded = fxp.scale_index_factor(factor, 1 / 16)
    assert folded.item() == pytest.approx(16 / 3)
    bias = fxp.scale_index_bias(torch.tensor([0.0]), hw)
    assert bias.item() == 37 * 2**hw.residual_bits
    assert fxp.sigma_from_index(torch.tensor(0.0)).item() == pytest.approx(2 ** (-111 / 32))
    assert fxp.sigma_from_index(torch.tensor(127.0)).item() == pytest.approx(2 ** (270 / 32))
    v = torch.tensor([-111 / 16, 0.0, 270 / 16])
    assert fxp.scale_index_from_v(v).tolist() == pytest.approx([0.0, 37.0, 127.0])


def test_a_nan_reaching_a_quantized_lagc_stays_nan_instead_of_crashing():
    """The non-finite guard must see the NaN; an out-of-bounds table read would crash first."""
    from _models import tiny_model

    model = tiny_model("w12a12", "qat")
    lagc = model.g_a[1]
    x = torch.full((1, lagc.channels, 4, 4), float("nan"))
    with torch.no_grad():
        assert torch.isnan(lagc(x)).all()
