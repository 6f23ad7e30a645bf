"""The layer-kind registry: a new kind is its modules plus one entry, and every consumer reads the entry."""

from __future__ import annotations

import pytest
import torch

from streamlic import W12A12, kinds, topology
from streamlic.config import SparsityConfig
from streamlic.export.header import _c_type_for
from streamlic.integer_layers import IntegerConv, as_int64
from streamlic.layers import QConv2d

PROBE = "probe_pointwise"


@pytest.fixture
def probe_kind():
    """A throwaway kind, a requantized 1x1 convolution with a multiplier of its own, registered for one test."""

    class ProbeConv(QConv2d):
        def integer_params(self):
            return {**super().integer_params(), "probe_gain": torch.ones(self.out_channels)}

    kind = kinds.register(kinds.LayerKind(
        PROBE,
        qat=lambda spec, hw, sp: ProbeConv(spec.in_channels, spec.out_channels, spec.kernel, hw=hw),
        integer=lambda spec, p, ctx: IntegerConv(spec.path, p, ctx.hw, ctx.input_bound),
        fields={**kinds.CONV_FIELDS, "probe_gain": kinds.MULTIPLIER},
        integer_step=lambda module: module.output_scale_map(), report_kind="probe", geometry=topology.GEOMETRY[topology.CONV]))
    yield kind
    kinds.unregister(PROBE)


def test_a_kind_registered_alone_builds_a_qat_layer_bit_exact_with_its_integer_layer(probe_kind):
    hw = W12A12
    spec = topology.LayerSpec("probe.0", PROBE, 8, 6, (1, 1))
    layer = kinds.build_qat(spec, hw, SparsityConfig())
    torch.manual_seed(0)
    x_int = torch.randint(-hw.act_max, hw.act_max + 1, (2, 8, 5, 7)).to(torch.float64)
    in_scale = 2.0**-6
    layer.train()
    layer(x_int.float() * in_scale)  # measures the activation range
    layer.freeze(in_scale)
    layer.quantized = True
    layer = layer.double().eval()
    with torch.no_grad():
        qat = layer(x_int * in_scale) / probe_kind.integer_step(layer)
    params = {key: value.detach().to(torch.float64).round().to(torch.int64)
              for key, value in layer.integer_params().items()}
    assert list(params) == list(probe_kind.fields)  # the export field list
    context = kinds.IntegerContext(hw, torch.zeros(1), topology.input_bound(spec, hw))
    integer = kinds.build_integer(spec, params, context)(as_int64(x_int))
    assert torch.equal(torch.round(qat).to(torch.int64), integer)
    assert float((qat - torch.round(qat)).abs().max()) < 1e-6  # on the integer grid
    assert bool((integer != 0).any())
    assert _c_type_for("probe_gain", hw) == "uint16_t"  # the header writes the new field in its width
    # the network table's geometry reads the entry too: a weighted layer, its positions and MACs
    assert spec.weighted and topology.conv_positions(spec, 5, 7) == topology.output_size(spec, 5, 7) == (5, 7)
    assert topology.macs_per_position(spec) == 8 * 6


def test_unregistering_forgets_the_kind_and_its_own_fields(probe_kind):
    kinds.unregister(PROBE)
    with pytest.raises(KeyError, match="no layer kind"):
        kinds.kind_of(topology.LayerSpec("probe.0", PROBE))
    with pytest.raises(KeyError):
        kinds.field_bits("probe_gain", W12A12)
    with pytest.raises(KeyError, match="no layer kind"):
        topology.output_size(topology.LayerSpec("probe.0", PROBE), 4, 4)
    assert kinds.field_bits("weight", W12A12) == (W12A12.weight_bits, True)
    kinds.register(probe_kind)  # the fixture unregisters it again


def test_every_kind_of_the_network_is_registered_and_field_formats_agree():
    from streamlic.config import ModelConfig

    assert {spec.kind for spec in topology.layers(ModelConfig())} <= set(kinds.KINDS)
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.KINDS[topology.CONV])
    clash = kinds.LayerKind("clash", qat=None, integer=None, fields={"weight": kinds.BIAS},
                            geometry=topology.GEOMETRY[topology.CONV])
    with pytest.raises(ValueError, match="field weight"):
        kinds.register(clash)
    with pytest.raises(ValueError, match="counts MACs"):
        kinds.register(kinds.LayerKind("unweighed", qat=None, integer=None, fields={"weight": kinds.WEIGHT}))
    assert "clash" not in kinds.KINDS and "unweighed" not in topology.GEOMETRY
