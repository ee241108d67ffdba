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


@pytest.mark.parametrize("dims,size,channels", [(2, 28, "[8,16]"), (2, 32, "[8,16,16]"), (3, 16, "[4,8]")])
def test_shapes_are_dimension_generic(dims, size, channels):
    cfg = _cfg(**{"model.spatial_dims": dims, "model.image_size": size, "model.channels": channels,
                  "model.in_channels": 2, "model.mask_channels": 1, "model.latent_dim": 8,
                  "model.num_res_units": 1})
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
