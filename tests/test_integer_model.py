"""The integer reference model against the QAT model, on real photos, for w12a12, w8a8 and per-layer widths."""

from __future__ import annotations

import pytest
import torch

from _models import sample_photos, tiny_model
from streamlic import fixedpoint as fxp
from streamlic.bitexact import BitExactReport, compare_with_qat, qat_integers
from streamlic.integer_model import IntegerModel
from streamlic.params import StageError
from streamlic.topology import pad_to_multiple
from streamlic.layers import LAGC, QConv2d

HARDWARE = ("w12a12", "w8a8", "mixed")  # mixed: g_a and g_s at 8 bits, the rest at 12
INTEGER_STAGES = ("qat", "pdf")  # right after QAT, and after stage 5 (PDF tables)


@pytest.fixture(scope="module")
def models():
    return {(hw, stage): tiny_model(hw, stage) for hw in HARDWARE for stage in INTEGER_STAGES}


@pytest.fixture(scope="module")
def integer_models(models):
    return {key: IntegerModel.from_model(model) for key, model in models.items()}


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


def test_photos_cover_sizes_that_need_padding(photos):
    sizes = [tuple(x.shape[-2:]) for _, x in photos]
    assert len(set(sizes)) == 3
    assert any(h % 64 == 0 and w % 64 == 0 for h, w in sizes)
    assert sum(h % 64 != 0 or w % 64 != 0 for h, w in sizes) >= 2


@pytest.mark.parametrize("stage", INTEGER_STAGES)
@pytest.mark.parametrize("hw", HARDWARE)
def test_qat_in_float64_matches_the_integer_model_at_every_layer(hw, stage, models, integer_models, photos):
    model, integer_model = models[hw, stage], integer_models[hw, stage]
    assert model.stage == stage
    for name, x in photos:
        report = compare_with_qat(model, x, integer_model)
        assert report.exact, f"{hw}/{stage}/{name}:\n{report}"
        compared = {layer.name for layer in report.layers}
        # every quantized layer, the row engine and the coded quantities were compared
        for layer in ("g_a.0", "g_a.1", "g_a.6", "h_a.3", "z_hat", "h_s.1", "h_s.2", "context_prediction.1",
                      "context_prediction.3", "entropy_parameters.0", "entropy_parameters.2", "symbols",
                      "pdf_index", "g_s.5", "g_s.6"):
            assert layer in compared, layer
        assert max(layer.max_off_grid for layer in report.layers) < 1e-6
        # the comparison is not vacuous: the photo codes to varied symbols and scale levels
        reference = integer_model.forward(pad_to_multiple(x))
        assert (reference["symbols"] != 0).float().mean() > 0.2
        assert reference["z_hat"].abs().max() > 5
        assert len(reference["pdf_index"].unique()) > 10


@pytest.mark.parametrize("hw", HARDWARE)
def test_float32_training_forward_agrees_on_latent_symbols(hw, models, integer_models, photos):
    model, integer_model = models[hw, "qat"], integer_models[hw, "qat"]
    total = mismatches = 0
    for _, x in photos:
        symbols = compare_with_qat(model, x, integer_model, dtype=torch.float32)["symbols"]
        total += torch.Size(symbols.shape).numel()
        mismatches += symbols.mismatches
    # float32 sums past 2**24 round (g_a.0 already accumulates up to ~2**25), so a few symbols near a
    # rounding boundary flip and propagate; how many depends on the model (0.1-0.4 % for the test
    # models). A wrong rule would change most of them.
    assert mismatches / total <= 1e-2, f"{mismatches} of {total} symbols differ in float32"


def test_float32_model_outputs_are_what_the_harness_compares(models, photos):
    """The harness reads the model's own coded outputs, so the float32 check is the training forward's."""
    model = models["w12a12", "qat"]
    x = pad_to_multiple(photos[0][1])
    with torch.no_grad():
        out = model(x)
    qat = qat_integers(model, x, torch.float32)
    assert torch.equal(qat["symbols"][0], out["y_symbols"])
    assert torch.equal(qat["pdf_index"][0], out["pdf_index"])


def test_sparse_and_dense_context_engines_agree(integer_models, photos):
    sparse = integer_models["w12a12", "qat"]
    dense = sparse.with_context_engine("dense")
    assert sparse.context["ctx1"].active_blocks == int(sparse.params["context_prediction.1"]["mask"][::12, ::12].sum())
    for _, x in photos[:2]:
        a, b = sparse.forward(pad_to_multiple(x)), dense.forward(pad_to_multiple(x))
        for key in ("context_prediction.1", "context_prediction.3", "entropy_parameters.2", "symbols", "pdf_index"):
            assert torch.equal(a[key], b[key]), key


def test_decoder_row_loop_reproduces_the_encoder(integer_models, photos):
    engine = integer_models["w8a8", "pdf"]
    x = pad_to_multiple(photos[1][1])
    y_q, z_hat = engine.analysis(x)
    params_q = engine.hyper_synthesis(z_hat)
    encoded = engine.encode_rows(y_q, params_q)
    requested = []

    def read_row(h, pdf_index_row):
        requested.append(h)
        assert torch.equal(pdf_index_row, encoded["pdf_index"][:, :, h:h + 1])
        return encoded["symbols"][:, :, h:h + 1]

    decoded = engine.decode_rows(params_q, read_row)
    assert requested == list(range(y_q.shape[2]))
    for key in ("symbols", "pdf_index", "y_hat_q"):
        assert torch.equal(decoded[key], encoded[key]), key
        assert decoded[key].dtype == torch.int64
    x_hat = engine.synthesis(decoded["y_hat_q"])
    assert x_hat.shape == x.shape and float(x_hat.min()) >= 0.0 and float(x_hat.max()) <= 1.0


def test_predict_row_is_one_step_of_the_row_loop(integer_models, photos):
    engine = integer_models["w12a12", "pdf"]
    record = engine.forward(pad_to_multiple(photos[0][1]))
    y_hat, params_q = record["y_hat"], record["h_s.2"]
    h = 5
    padded = torch.nn.functional.pad(y_hat, (1, 1, 3, 0))
    mu_q, index = engine.predict_row(padded[:, :, h:h + 3], params_q[:, :, h:h + 1])
    assert mu_q.shape == index.shape == (1, engine.M, 1, y_hat.shape[3])
    assert torch.equal(mu_q, record["entropy_parameters.2"][:, 0::2, h:h + 1])
    assert torch.equal(index, record["pdf_index"][:, :, h:h + 1])
    assert int(index.min()) >= 0 and int(index.max()) < fxp.SCALE_LEVELS


def test_decoder_rejects_malformed_rows(integer_models):
    engine = integer_models["w12a12", "qat"]
    params_q = engine.hyper_synthesis(torch.zeros(1, engine.N, 1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="read_row\\(0\\) returned shape"):
        engine.decode_rows(params_q, lambda h, index: torch.zeros(1, engine.M, 1, 2))
    with pytest.raises(ValueError, match="outside"):
        engine.decode_rows(params_q, lambda h, index: torch.full_like(index, 200))


def test_harness_names_the_first_layer_that_differs(models, photos):
    model = models["w12a12", "qat"]
    params = model.export_quantized_parameters()
    params["g_s.3"]["score_bias"][0] += 40  # one integer of one LAGC channel is off
    tampered = IntegerModel.from_model(model, params=params)
    report = compare_with_qat(model, photos[0][1], tampered)
    assert isinstance(report, BitExactReport) and not report.exact
    assert report.first_mismatch.name == "g_s.3"
    assert all(layer.mismatches == 0 for layer in report.layers[:[l.name for l in report.layers].index("g_s.3")])
    assert report["g_s.3"].max_abs_diff > 0
    assert "first differing layer: g_s.3" in str(report)


def test_pre_qat_models_are_refused():
    for stage in ("aun", "mask"):
        with pytest.raises(StageError, match=f"stage '{stage}'.*QAT"):
            IntegerModel.from_model(tiny_model(stage=stage))


def test_analysis_needs_multiples_of_64(integer_models):
    with pytest.raises(ValueError, match="pad_to_multiple"):
        integer_models["w12a12", "qat"].analysis(torch.rand(1, 3, 64, 100))


def test_pad_to_multiple_replicates_the_edges():
    x = torch.rand(1, 3, 70, 64)
    padded = pad_to_multiple(x)
    assert padded.shape == (1, 3, 128, 64)
    assert torch.equal(padded[..., :70, :], x)
    assert torch.equal(padded[..., 70:, :], x[..., 69:70, :].expand(-1, -1, 58, -1))
    assert pad_to_multiple(padded) is padded
    assert pad_to_multiple(torch.rand(3, 5, 130)).shape == (3, 64, 192)


def test_model_hash_follows_every_integer(models):
    model = models["w12a12", "qat"]
    first = IntegerModel.from_model(model)
    assert first.model_hash == IntegerModel.from_model(model).model_hash
    assert len(first.model_hash) == 64
    params = model.export_quantized_parameters()
    params["context_prediction.3"]["scale_shift"][3] += 1
    assert IntegerModel.from_model(model, params=params).model_hash != first.model_hash
    assert IntegerModel.from_model(models["w12a12", "pdf"]).model_hash != first.model_hash


def test_integer_model_holds_integers_only(integer_models):
    engine = integer_models["w12a12", "qat"]
    for layer, params in engine.params.items():
        for key, value in params.items():
            assert value.dtype == (torch.float64 if key.startswith("float_") else torch.int64), (layer, key)
    assert engine.cdf_y.shape == (fxp.SCALE_LEVELS, fxp.SYMBOL_COLUMNS + 2) and engine.cdf_y.dtype == torch.int32
    assert engine.cdf_z.shape == (engine.N, fxp.SYMBOL_COLUMNS + 2)


def test_integer_parameters_do_not_depend_on_the_training_precision(models):
    """float32 training reads the same integers the float64 export holds (ties near .5 included)."""
    for (hw, stage), model in models.items():
        exported = model.export_quantized_parameters()
        for name, module in model.named_modules():
            if isinstance(module, (QConv2d, LAGC)):
                for key, value in module.integer_params().items():
                    expected = exported[name][key]
                    if key == "mask" and not module.masked:
                        continue
                    assert torch.equal(value.to(torch.int64), expected), (hw, stage, name, key)
