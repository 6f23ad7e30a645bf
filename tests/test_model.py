"""The StreamLIC network and its five-stage API on real photos (docs/architecture.md, docs/stages.md)."""

import copy
import io
from pathlib import Path

import pytest
import torch

from _models import TINY_MODEL as TINY
from streamlic import W8A8, W12A12, ConfigError, StreamLIC
from streamlic.layers import LAGC, FGPConv2d, QConv2d
from streamlic.metrics import rate_distortion
from streamlic.stage import STATE_VERSION

SPARSE = {"density": 0.5}  # with M = 24 this keeps 1 of 2 (ctx1) and 2 of 4 (ctx2, ep) input groups per tap


def rd_loss(model, x, lmbda=0.01):
    out = model(x)
    return rate_distortion(out, x, lmbda)["loss"], out


def train_steps(model, x, steps, lr=1e-3):
    model.train()
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss, _ = rd_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


STAGE_ORDER = ["aun", "mask", "qat", "fix_encoder", "pdf"]


def state_bytes(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def trained_through(hw, photos, last_stage, steps=3):
    torch.manual_seed(0)
    model = StreamLIC(model=TINY, hardware=hw, sparsity=SPARSE)
    for stage in STAGE_ORDER[: STAGE_ORDER.index(last_stage) + 1]:
        model.enter_stage(stage)
        train_steps(model, photos, steps)
    return model


def expected_trainable(model, stage):
    names = {n for n, _ in model.named_parameters() if not n.endswith("quantiles")}
    tables = {n for n in names if n.startswith("rectified_cdf")}
    encoder = {n for n in names if n.startswith(("g_a.", "h_a."))}
    if stage == "pdf":
        return tables
    if stage == "fix_encoder":
        return names - tables - encoder
    return names - tables


@pytest.mark.parametrize("hw", [W12A12, W8A8], ids=["w12a12", "w8a8"])
def test_every_stage_trains_exactly_its_parameters(hw, photos):
    torch.manual_seed(0)
    model = StreamLIC(model=TINY, hardware=hw, sparsity=SPARSE)
    model.train()
    for stage in STAGE_ORDER:
        model.enter_stage(stage)
        assert model.stage == stage
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = train_steps(model, photos, 2)
        assert torch.isfinite(torch.tensor(loss)), stage
        model.zero_grad(set_to_none=True)
        loss, _ = rd_loss(model, photos)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and not n.endswith("quantiles")}
        expected = expected_trainable(model, stage)
        # every parameter the stage trains receives a gradient, and no other one does
        assert with_grad == expected, (stage, sorted(with_grad ^ expected)[:5])
        nonzero = {n for n in with_grad if dict(model.named_parameters())[n].grad.abs().sum() > 0}
        assert len(nonzero) >= 0.9 * len(expected), stage
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed - {n for n in changed if n.endswith("quantiles")} <= expected, stage


def test_stage_is_restored_from_the_state_dict_bit_identically(photos):
    torch.manual_seed(0)
    model = StreamLIC(model=TINY, sparsity=SPARSE)
    for stage in STAGE_ORDER:
        model.enter_stage(stage)
        train_steps(model, photos, 2)
        saved = state_bytes(model)
        fresh = StreamLIC(model=TINY, sparsity=SPARSE)
        fresh.load_state_dict(torch.load(saved, weights_only=False))
        assert fresh.stage == model.stage == stage
        model.eval()
        fresh.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            expected = model(photos)
            torch.manual_seed(1)
            got = fresh(photos)
        assert torch.equal(expected["x_hat"], got["x_hat"]), stage
        for key in ("y", "z"):
            assert torch.equal(expected["likelihoods"][key], got["likelihoods"][key]), (stage, key)
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
            {n for n, p in model.named_parameters() if p.requires_grad}
        model.train()


def test_loading_and_re_entering_qat_never_recompute_scales_or_masks(photos):
    model = trained_through(W12A12, photos, "qat")
    frozen = {n: b.clone() for n, b in model.named_buffers()
              if n.endswith(("weight_absmax", "affine_absmax", "gain_scale", "req_m", "mask", "act_absmax"))}
    # the weights move after the freeze; a recapture would change the frozen buffers
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.toggle_quantization(True)
    model.set_all_mask()
    fresh = StreamLIC(model=TINY, sparsity=SPARSE)
    fresh.load_state_dict(model.state_dict())
    fresh.toggle_quantization(True)
    fresh.set_all_mask()
    fresh_buffers = dict(fresh.named_buffers())
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_buffers())[name], value), name
        assert torch.equal(fresh_buffers[name], value), name


def test_eval_before_qat_runs_the_trained_float_model(photos):
    torch.manual_seed(0)
    model = StreamLIC(model=TINY, sparsity=SPARSE)
    image = photos[:1]
    train_steps(model, image, 150, lr=3e-3)
    model.eval()
    assert model.stage == "aun" and not model.quantized
    with torch.no_grad():
        x_hat = model(image)["x_hat"]
    mse = torch.mean((x_hat - image) ** 2).item()
    constant_mse = torch.mean((image - image.mean()) ** 2).item()
    # the research code zeroed every weight in eval mode before QAT: its output was constant
    assert mse < 0.25 * constant_mse
    assert x_hat.std() > 0.02
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.g_s[0].weight.mul_(0.5)
        assert not torch.equal(perturbed(image)["x_hat"], x_hat)


def test_set_all_mask_matches_a_brute_force_selection(photos):
    torch.manual_seed(0)
    model = StreamLIC(model=TINY, sparsity=SPARSE)
    train_steps(model, photos, 2)
    model.set_all_mask()
    for name, layer in model.sparse_layers().items():
        c_out, c_in, kh, kw = layer.weight.shape
        pi, po = layer.block_in, layer.block_out
        std = torch.sqrt(layer.in_sqmean - layer.in_mean**2)
        weighted = layer.weight.detach() * std.view(1, -1, 1, 1)
        reference = torch.zeros_like(layer.mask)
        for g in range(c_out // po):
            candidates = []
            for i in range(c_in // pi):
                for u in range(kh):
                    for v in range(kw):
                        block = weighted[g * po:(g + 1) * po, i * pi:(i + 1) * pi, u, v]
                        candidates.append((torch.norm(block).item(), i, u, v))
            candidates.sort(key=lambda c: -c[0])
            for _, i, u, v in candidates[: kh * kw * layer.group_num]:
                reference[g * po:(g + 1) * po, i * pi:(i + 1) * pi, u, v] = 1
        assert torch.equal(layer.mask, reference), name
        kept = layer.block_mask().view(layer.out_groups, -1).sum(dim=1)
        assert kept.tolist() == [kh * kw * layer.group_num] * layer.out_groups, name


def test_default_model_keeps_the_paper_block_counts():
    model = StreamLIC()
    counts = {name: layer.blocks_per_group for name, layer in model.sparse_layers().items()}
    assert counts == {"ctx1": 27, "ctx2": 9, "ep": 12}
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.record_stats(torch.randn(2, layer.in_channels, 4, 4))
    model.set_all_mask()
    for name, layer in model.sparse_layers().items():
        density = layer.mask.mean().item()
        assert density == pytest.approx({"ctx1": 27 / 144, "ctx2": 9 / 96, "ep": 12 / 96}[name])


def test_out_of_range_symbols_are_clamped_and_counted(photos):
    model = trained_through(W12A12, photos, "pdf", steps=1)
    ep = model.sparse_layers()["ep"]
    with torch.no_grad():
        ep.bias[0::2] = -1000.0  # means far below every latent: y - mu leaves the 8-bit range
    model.clamped_symbols.zero_()
    loss = train_steps(model, photos, 1)
    assert torch.isfinite(torch.tensor(loss))
    assert model.clamped_symbols.item() > 0
    model.eval()
    with torch.no_grad():
        out = model(photos)
    assert out["y_symbols"].abs().max().item() == 127


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"model": {**TINY, "M": 20}}, "model.M"),
        ({"sparsity": {"density": 0.0}}, "sparsity.density"),
        ({"sparsity": {"density": 1.5}}, "sparsity.density"),
        ({"sparsity": {"layers": {"ctx1": -0.1}}}, "sparsity.layers.ctx1"),
        ({"sparsity": {"layers": {"conv9": 0.5}}}, "sparsity.layers.conv9"),
        ({"hardware": {"activation_bits": 4}}, "hardware.activation_bits"),
        ({"hardware": {"activation_bits": 12, "precision_bits": 13}}, "hardware.precision_bits"),
        ({"hardware": {"multiplier_bits": 40}}, "hardware.multiplier_bits"),
        ({"hardware": {"shift_bits": 7}}, "hardware.shift_bits"),
        ({"hardware": {"block_in": 10}}, "hardware.block_in"),
        ({"model": {**TINY, "c9": 3}}, "model"),
    ],
)
def test_bad_configs_fail_before_any_tensor_naming_the_key(kwargs, key, monkeypatch):
    built = []
    monkeypatch.setattr(QConv2d, "__init__", lambda *a, **k: built.append(a))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        StreamLIC(**({"model": TINY} | kwargs))
    assert not built


def test_layers_are_named_for_error_messages():
    model = StreamLIC(model=TINY)
    assert model.g_a[0].layer_name == "g_a.0"
    assert isinstance(model.g_a[1], LAGC) and model.g_a[1].layer_name == "g_a.1"
    assert isinstance(model.entropy_parameters[2], FGPConv2d)
    assert model.entropy_parameters[2].layer_name == "entropy_parameters.2"


def test_version_1_state_loads_with_the_research_module_paths():
    """A QAT state saved by release 0.1 (``g_s.0.conv.weight``, context layers at 0 and 2) loads unchanged in meaning."""
    saved = torch.load(Path(__file__).parent / "data" / "tiny_qat_state_v1.pt", weights_only=False)
    state = saved["state_dict"]
    assert state["_extra_state"]["version"] == 1 and "g_s.0.conv.weight" in state
    model = StreamLIC(model=TINY, hardware=W12A12, sparsity={"density": 0.5})
    model.load_state_dict(state)
    assert model.stage == "qat"
    assert torch.equal(model.g_s[0].weight, state["g_s.0.conv.weight"])
    assert torch.equal(model.context_prediction[1].mask, state["context_prediction.0.mask"])
    assert torch.equal(model.context_prediction[3].in_scale, state["context_prediction.2.in_scale"])
    assert model.get_extra_state()["version"] == STATE_VERSION
    with torch.no_grad():
        out = model.eval()(saved["x"])
    assert torch.equal(out["x_hat"], saved["x_hat"])
    assert torch.equal(out["y_symbols"].to(torch.int8), saved["y_symbols"])


def test_state_from_a_newer_release_is_refused_clearly():
    model = StreamLIC(model=TINY, hardware=W12A12)
    state = model.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "version": STATE_VERSION + 1}
    with pytest.raises(ValueError, match=f"model state version {STATE_VERSION + 1}"):
        StreamLIC(model=TINY, hardware=W12A12).load_state_dict(state)


def test_the_stage_is_one_state_and_impossible_ones_are_refused():
    model = StreamLIC(model=TINY, hardware=W12A12)
    with pytest.raises(RuntimeError, match="fix_encoder_flag.*stage 'aun'.*qat"):
        model.fix_encoder_flag(True)  # the encoder is fixed after QAT, not before
    assert model.stage == "aun" and not model.encoder_fixed
    state = model.state_dict()
    for broken, rule in (({"stage": "pdf", "prepared": ["masks", "scales"]}, "needs initialised tables"),
                         ({"stage": "qat", "prepared": []}, "needs frozen scales"),
                         ({"stage": "mask", "masked": False}, "applies the masks")):
        state["_extra_state"] = {**model.get_extra_state(), **broken}
        with pytest.raises(ValueError, match=rule):
            StreamLIC(model=TINY, hardware=W12A12).load_state_dict(state)


@pytest.mark.parametrize("stage", ["qat", "fix_encoder"])
def test_a_qat_step_forms_all_integers_together_exactly_as_each_layer_alone(stage, photos):
    """The batched formation (streamlic.layers.batch) changes no integer and no gradient bit."""
    from streamlic.layers.batch import form_integers

    model = trained_through(W12A12, photos, stage, steps=1).train()
    model._form_integers()
    formed = dict(model.integer_parameters.current)
    trainable = {layer.layer_name for layer in model._quant_layers
                 if (layer.affine.weight if isinstance(layer, LAGC) else layer.weight).requires_grad}
    assert set(formed) == trainable
    assert (stage == "qat") == (len(trainable) == len(model._quant_layers))  # stage 4 freezes the encoder
    kinds = {type(model.get_submodule(name)).__name__ for name in formed}  # plain convs are the encoder's
    assert kinds == {"QConv2d", "QUpsampleConv2d", "FGPConv2d", "LAGC"} - ({"QConv2d"} if stage == "fix_encoder" else set())
    hw = model.hw
    for name, together in formed.items():
        layer = model.get_submodule(name)
        alone = form_integers(layer)
        assert len(together) == len(alone)
        for a, b in zip(together, alone):
            assert torch.equal(a, b), name
        if isinstance(layer, LAGC):  # the gain multiplier of the export's own (checked) path
            m_g, k_g = layer._gain_multiplier()
            assert torch.equal(together[4], torch.ldexp(m_g, -k_g).float()), name
            continue
        # docs/fixed-point.md from scratch: q_w = round(clamp(w, +-max|w_c|) / s_w), b_q = round(2**r b / s_out)
        scale = (layer.weight_absmax.double() / hw.weight_max).view(-1, 1, 1, 1)
        w = torch.maximum(torch.minimum(layer.weight.double(), layer.weight_absmax.double().view(-1, 1, 1, 1)),
                          -layer.weight_absmax.double().view(-1, 1, 1, 1))
        expected = torch.round(w / scale) * (layer.mask if getattr(layer, "masked", False) else 1)
        assert torch.equal(together[0].double(), expected), name
        if not getattr(layer, "pdf_index", False):
            # a fixed-scale layer outputs at 2**-(A-8); the others at their range over 2**(A-1) - 1
            s_out = layer.act_absmax.double() / hw.act_max if layer.fixed_scale is None else hw.latent_scale
            b_q = torch.clamp(torch.round(2.0**hw.residual_bits * layer.bias.double() / s_out), -hw.bias_max, hw.bias_max)
            assert torch.equal(together[1].view(-1).double(), b_q + 2.0 ** (hw.residual_bits - 1)), name

    def step(batched: bool):
        twin = copy.deepcopy(model)
        for layer in twin._quant_layers:
            layer.integer_parameters = twin.integer_parameters if batched else None
        torch.manual_seed(3)
        loss, out = rd_loss(twin, photos)
        loss.backward()
        return out, {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}

    (out_together, grads_together), (out_alone, grads_alone) = step(True), step(False)
    assert torch.equal(out_together["x_hat"], out_alone["x_hat"])
    assert grads_together.keys() == grads_alone.keys()
    for name, grad in grads_together.items():
        assert torch.equal(grad, grads_alone[name]), name


def test_a_forward_that_raises_leaves_no_integers_or_ranges_behind(photos, monkeypatch):
    """What a training forward gathers (integers inside an autograd graph, tracked outputs) ends with it."""
    model = trained_through(W12A12, photos, "qat", steps=1).train()

    def fail(x):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(model.g_s[2], "forward", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        rd_loss(model, photos)
    assert model.integer_parameters.current == {} and model.range_tracker.pending == []
    monkeypatch.undo()
    twin = copy.deepcopy(model)  # no non-leaf tensor left to copy
    loss, _ = rd_loss(twin, photos)
    assert torch.isfinite(loss)
