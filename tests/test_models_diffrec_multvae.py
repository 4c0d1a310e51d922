"""DiffRec and Mult-VAE: the retrieval identity, sparse == dense, losses by hand."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scale_diffrec.config import load_config
from scale_diffrec.data.csr import CSR
from scale_diffrec.models import Progress, build_model
from scale_diffrec.models.diffrec import DiffRec
from scale_diffrec.models.multvae import MultVAE, kl_divergence


def _batch(n_rows=6, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_rows, n_items)) < 0.2
    mask[:, 0] = True
    r, c = np.nonzero(mask)
    return CSR.from_pairs(r, c, n_rows, n_items, rng.uniform(0.5, 1.0, len(r))).to_torch()


def _cfg(model, *extra):
    return load_config(None, [f"model={model}", "denoiser.dims=[8, 12]", "diffusion.steps=6",
                              "multvae.dims=[4, 10]", *extra])


def _assert_heads_equal_score(model, batch):
    model.eval()
    scores = model.score(batch)
    (name, q), = model.query(batch).items()
    (head,) = model.item_heads()
    assert head.name == name
    torch.testing.assert_close(q @ head.weight.T + head.bias, scores[:, head.items],
                               rtol=1e-6, atol=1e-6)


def test_diffrec_score_equals_its_head_for_noisy_and_clean_inference():
    torch.manual_seed(0)
    for extra in ([], ["diffusion.sampling_steps=3"]):
        model = build_model(_cfg("diffrec", *extra), 30)
        assert isinstance(model, DiffRec)
        batch = _batch()
        model.eval()
        scores = model.score(batch)         # sampling_steps > 0: the rows' keyed noise
        (q,) = model.query(batch).values()
        (head,) = model.item_heads()
        torch.testing.assert_close(q @ head.weight.T + head.bias, scores, rtol=1e-6, atol=1e-6)


def test_diffrec_training_updates_and_checkpoints_the_sampler():
    torch.manual_seed(0)
    model = build_model(_cfg("diffrec", "diffusion.history_per_step=2"), 30)
    for step in range(10):
        loss = model.training_loss(_batch(seed=step), Progress(step=step))["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    assert model.sampler.loss_counts.sum() > 0
    state = model.state_dict()
    assert "sampler.loss_history" in state and "sampler.loss_counts" in state
    fresh = build_model(_cfg("diffrec", "diffusion.history_per_step=2"), 30)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.sampler.probabilities(), model.sampler.probabilities())


def test_multvae_sparse_encoder_equals_dense_linear_and_loss_by_hand():
    torch.manual_seed(0)
    model = build_model(_cfg("multvae", "multvae.dropout=0.0"), 30)
    assert isinstance(model, MultVAE)
    batch = _batch()
    x = batch.dense()
    dense_first = F.normalize(x) @ model.first.bag.weight + model.first.bias
    h = dense_first
    for layer in model.q_rest:
        h = layer(torch.tanh(h))
    mu, logvar = model.encode(batch)
    torch.testing.assert_close(mu, h[:, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar, h[:, 4:], rtol=1e-5, atol=1e-6)

    torch.manual_seed(3)
    out = model.training_loss(batch, Progress(step=20000))
    torch.manual_seed(3)
    mu, logvar = model.encode(batch)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    nll = -(F.log_softmax(model.decode(z), 1) * x).sum(1).mean()
    expected = nll + 20000 / 200000 * kl_divergence(mu, logvar)   # beta below its cap
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    _assert_heads_equal_score(model, batch)


def test_multvae_beta_anneals_to_its_cap():
    model = build_model(_cfg("multvae", "multvae.total_anneal_steps=100"), 30)
    assert model.beta(0) == 0.0 and model.beta(10) == 0.1 and model.beta(50) == 0.2 and model.beta(10**6) == 0.2


def test_build_model_reads_the_typed_config_and_takes_its_dict_alike():
    from scale_diffrec.choices import MeanType
    from scale_diffrec.config import typed
    from scale_diffrec.errors import ConfigError
    from scale_diffrec.models.samplers import LossSecondMomentResampler, UniformSampler
    cfg = _cfg("diffrec", "diffusion.mean_type=eps", "diffusion.sampler=uniform")
    torch.manual_seed(0)
    from_dict = build_model(cfg, 30)
    torch.manual_seed(0)
    from_typed = build_model(typed(cfg), 30)
    assert from_dict.diffusion.mean_type is MeanType.eps
    assert type(from_dict.sampler) is UniformSampler and from_dict.sampler.steps == 6
    assert [layer.out_features for layer in from_dict.denoiser.out_layers] == [12, 30]
    for name, value in from_typed.state_dict().items():
        torch.testing.assert_close(value, from_dict.state_dict()[name], rtol=0, atol=0)
    assert isinstance(build_model(_cfg("diffrec"), 30).sampler, LossSecondMomentResampler)
    vae = build_model(_cfg("multvae", "multvae.total_anneal_steps=7"), 30)
    assert vae.latent == 4 and vae.total_anneal_steps == 7
    cfg["denoiser"]["dims"] = []                 # a dict edited by hand is validated
    with pytest.raises(ConfigError, match="config key 'denoiser.dims' must not be empty"):
        build_model(cfg, 30)
