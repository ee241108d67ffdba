import pytest
import torch

from pancreas_gvae.config import load_config
from pancreas_gvae.models import build_model


def _cfg(**over):
    items = [f"{k}={v}" for k, v in over.items()]
    return load_config(overrides=items)


@pytest.mark.parametrize("kind,has_e,has_d", [("gvae", True, True), ("vae", True, False), ("gan", False, True)])
def test_parts_per_kind(kind, has_e, has_d):
    m = build_model(_cfg(**{"model.kind": kind}).model)
    assert (m.encoder is not None) == has_e
    assert (m.discriminator is not None) == has_d
    assert m.generator is not None


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
@pytest.mark.parametrize("dims,size,channels", [(2, 28, "[8,16]"), (2, 32, "[8,16,16]"), (3, 16, "[4,8]")])
def test_shapes_are_dimension_generic(dims, size, channels, upsample):
    cfg = _cfg(**{"model.spatial_dims": dims, "model.image_size": size, "model.channels": channels,
                  "model.in_channels": 2, "model.mask_channels": 1, "model.latent_dim": 8,
                  "model.num_res_units": 1, "model.generator_upsample": upsample})
    m = build_model(cfg.model)
    x = torch.rand(3, 2, *([size] * dims))
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    out = m.decode(mu)
    assert out.shape == x.shape
    assert 0 <= out.min() and out.max() <= 1
    feats, logit = m.discriminator(x)
    assert logit.shape == (3,)
    assert feats.shape[0] == 3 and feats.ndim == dims + 2


def test_spectral_norm_is_applied_to_discriminator_only():
    m = build_model(_cfg().model)
    parametrized = [n for n, mod in m.discriminator.named_modules() if hasattr(mod, "parametrizations")]
    assert parametrized, "spectral norm expected on D's convolutions and head"
    assert not any(hasattr(mod, "parametrizations") for mod in m.generator.modules())
    m2 = build_model(_cfg(**{"model.spectral_norm": False}).model)
    assert not any(hasattr(mod, "parametrizations") for mod in m2.discriminator.modules())


def test_image_size_must_fit_levels():
    from pancreas_gvae.errors import PipelineError

    with pytest.raises(PipelineError, match="divisible"):
        _cfg(**{"model.image_size": 28, "model.channels": "[8,16,32]"})


def test_gan_has_no_encoder_message():
    m = build_model(_cfg(**{"model.kind": "gan"}).model)
    with pytest.raises(ValueError, match="no encoder"):
        m.encode(torch.rand(1, 1, 28, 28))


@pytest.mark.parametrize("upsample,flat", [("transposed", False), ("nearest", True)])
def test_nearest_upsampling_draws_no_checkerboard(upsample, flat):
    """A constant feature map stays flat through a nearest + 3x3 level; a stride-2 transposed one tiles it.

    Uneven kernel overlap makes the transposed convolution's output alternate with period 2 (Odena et al.
    2016): the checkerboard in the NIH grids of docs/results.md. Interior pixels only (padding edges differ).
    """
    from pancreas_gvae.models.networks import _level

    torch.manual_seed(0)
    level = _level(2, 4, 4, norm=None, act=None, res_units=0, transposed=True, upsample=upsample)
    with torch.no_grad():
        out = level(torch.ones(1, 4, 8, 8))[..., 2:-2, 2:-2]
    assert out.shape[-1] == 12
    spread = (out - out.mean(dim=(-2, -1), keepdim=True)).abs().amax().item()
    assert (spread < 1e-5) == flat, spread
    nets = build_model(_cfg(**{"model.generator_upsample": upsample}).model).generator
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in nets.modules()) == (not flat)


def test_generator_upsample_is_checked():
    from pancreas_gvae.errors import PipelineError

    with pytest.raises(PipelineError, match="generator_upsample"):
        _cfg(**{"model.generator_upsample": "bilinear"})
