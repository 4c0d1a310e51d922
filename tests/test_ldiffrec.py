"""L-DiffRec: per-cluster sparse encoders, both decoder forms, the catalogue-wide softmax
written cluster by cluster, annealing, retrieval heads, and one batch of ML-1M."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scale_diffrec.config import load_config
from scale_diffrec.data.csr import CSR
from scale_diffrec.models import Progress, build_model, parameter_groups
from scale_diffrec.models.clusters import latent_dims
from scale_diffrec.models.ldiffrec import LDiffRec, beta_at, lamda_at
from scale_diffrec.models.linear_logsumexp import combine_logsumexp, combine_multinomial
from scale_diffrec.partition import Partition
from scale_diffrec.schema import LDiffRecConfig

ML1M = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diffrec" / "ml-1m_clean"
N_USERS, N_ITEMS = 40, 30


def toy_partition(sizes=(4, 11, 15), seed=0):
    """Uneven clusters over shuffled items."""
    cluster_of = np.repeat(np.arange(len(sizes)), sizes)
    return Partition(np.random.default_rng(seed).permutation(cluster_of), len(sizes))


def toy_csr(seed=0, weights=False):
    rng = np.random.default_rng(seed)
    mask = rng.random((N_USERS, N_ITEMS)) < 0.25
    mask[3] = False                      # a user with no items at all
    mask[5, :] = False
    mask[5, 0] = True                    # a user with one item
    r, c = np.nonzero(mask)
    values = rng.uniform(0.1, 1.0, len(r)).astype(np.float32) if weights else None
    return CSR.from_pairs(r, c, N_USERS, N_ITEMS, values)


def make_cfg(*extra):
    return load_config(None, ["model=ldiffrec", "seed=3", "ldiffrec.n_clusters=3",
                              "ldiffrec.in_dims=[12]", "ldiffrec.mlp_dims=[16]",
                              "denoiser.emb_size=4", "diffusion.steps=5",
                              "diffusion.noise_scale=0.1", "diffusion.noise_min=0.001",
                              "diffusion.noise_max=0.02", *extra])


def make_model(*extra, partition=None, seed=0):
    torch.manual_seed(seed)
    cfg = make_cfg(*extra)
    return LDiffRec.from_config(cfg, N_ITEMS, partition or toy_partition()), cfg


def batch_of(csr, rows=None):
    rows = np.arange(csr.n_rows) if rows is None else rows
    return csr.take_rows(rows).to_torch()


# ------------------------------------------------------------------ structure
def test_latent_dims_follow_the_reference_rounding():
    # ML-1M k-means sizes: int(1667/2810*300) = 177, the last cluster gets the rest
    assert latent_dims([1667, 1143], [300]) == [[177], [123]]
    # truncation, 0 -> 1, remainder to the last cluster
    assert latent_dims([1, 1, 98], [10]) == [[1], [1], [8]]
    # flag order: [latent, hidden] is reversed into encoder order [hidden, latent]
    assert latent_dims([50, 50], [20, 60]) == [[30, 10], [30, 10]]
    assert latent_dims([7], [12]) == [[12]]
    with pytest.raises(Exception, match="in_dims"):
        latent_dims([1, 1, 1, 1], [2])


def test_model_shapes_and_parameter_counts():
    model, _ = make_model()
    p = model.partition
    assert model.latent_sizes == [dims[-1] for dims in latent_dims(p.sizes, [12])]
    assert sum(model.latent_sizes) == 12 == model.latent_size
    for c, enc in enumerate(model.encoders):
        assert enc.first.weight.shape == (p.sizes[c], 2 * model.latent_sizes[c])
    assert model.decoder.weight.shape == (N_ITEMS, 12)
    counts = model.parameter_counts()
    assert counts["total"] == sum(q.numel() for q in model.parameters())
    assert counts["encoders"] == sum(int(s) * 2 * l + 2 * l
                                     for s, l in zip(p.sizes, model.latent_sizes))
    assert counts["decoder"] == N_ITEMS * 12 + N_ITEMS
    assert set(counts) == {"encoders", "decoder", "denoiser", "total"}


def test_param_groups_give_the_autoencoder_its_own_lr():
    model, cfg = make_model("ldiffrec.lr_vae=0.001", "lr=0.0005")
    groups = parameter_groups(model, cfg)
    assert [g["lr"] for g in groups] == [0.001, 0.0005]
    ids = [set(map(id, g["params"])) for g in groups]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(map(id, model.parameters()))
    assert ids[1] == set(map(id, model.denoiser.parameters()))
    model, cfg = make_model()
    assert [g["lr"] for g in parameter_groups(model, cfg)] == [cfg["lr"], cfg["lr"]]
    torch.optim.AdamW(parameter_groups(model, cfg))        # accepted by the optimiser


# ------------------------------------------------------------------ encoders
def test_sparse_encoder_equals_dense_linear_on_the_cluster_slice():
    model, _ = make_model()
    model.eval()
    csr = toy_csr(weights=True)
    batch = batch_of(csr)
    dense = batch.dense()
    for c in range(model.n_clusters):
        enc = model.encoders[c]
        items = model.items_of(c)
        h = torch.tanh(dense[:, items] @ enc.first.weight + enc.first_bias)
        mu, logvar = model.encode_cluster(c, batch)
        l = model.latent_sizes[c]
        torch.testing.assert_close(mu, h[:, :l], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logvar, h[:, l:], rtol=1e-6, atol=1e-6)
        assert mu.abs().max() < 1 and logvar.abs().max() < 1      # tanh after the last layer


def test_cluster_inputs_equal_cluster_input():
    model, _ = make_model()
    model.train()                       # dropout on: both paths draw from the keyed streams
    batch = batch_of(toy_csr())
    gens = [model.cluster_generator(7, c, "cpu") for c in range(model.n_clusters)]
    for c, inp in enumerate(model.cluster_inputs(batch, gens)):
        one = model.cluster_input(c, batch, model.cluster_generator(7, c, "cpu"))
        assert (one.values == 0).any()  # dropout really dropped something
        for name in ("rows", "local", "values", "target", "offsets"):
            assert torch.equal(getattr(inp, name), getattr(one, name))


def test_cluster_encoder_sees_only_its_items():
    model, _ = make_model()
    model.eval()
    csr = toy_csr(weights=True)
    batch = batch_of(csr)
    cl = model.cluster_of[batch.indices]
    for c in range(model.n_clusters):
        mu, logvar = model.encode_cluster(c, batch)
        # perturb every other cluster's values: mu_c / logvar_c unchanged
        other = batch_of(csr)
        other.values = torch.where(cl == c, other.values, other.values * 7.0 - 3.0)
        mu2, logvar2 = model.encode_cluster(c, other)
        assert torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
        # gradient w.r.t. other clusters' entries is exactly zero, own entries nonzero
        values = batch.values.clone().requires_grad_(True)
        probe = batch_of(csr)
        probe.values = values
        mu, logvar = model.encode_cluster(c, probe)
        (mu.sum() + logvar.pow(2).sum()).backward()
        assert torch.all(values.grad[cl != c] == 0)
        assert torch.any(values.grad[cl == c] != 0)


def test_input_dropout_on_nonzeros_is_inverted_dropout():
    model, _ = make_model("ldiffrec.dropout=0.5")
    model.train()
    batch = batch_of(toy_csr(weights=True))
    for c in range(model.n_clusters):
        inp = model.cluster_input(c, batch, model.cluster_generator(0, c, "cpu"))
        clean = model.cluster_input(c, batch)  # no generator: still dropout, other draw
        raw = batch.values[model.cluster_of[batch.indices] == c]
        kept = inp.values != 0
        assert torch.allclose(inp.values[kept], raw[kept] * 2.0)
        assert 0 < kept.sum() < len(raw)
        assert torch.equal(inp.target, inp.values)          # reference: target = dropped x
        # the same (step, cluster) key gives the same mask
        again = model.cluster_input(c, batch, model.cluster_generator(0, c, "cpu"))
        assert torch.equal(again.values, inp.values)
        assert clean.values.shape == inp.values.shape
    model, _ = make_model("ldiffrec.dropout=0.5", "ldiffrec.recon_target=clean")
    model.train()
    inp = model.cluster_input(0, batch, model.cluster_generator(0, 0, "cpu"))
    assert torch.equal(inp.target, batch.values[model.cluster_of[batch.indices] == 0])
    model.eval()                                          # eval: no dropout
    inp = model.cluster_input(0, batch)
    assert torch.equal(inp.values, inp.target)


# ------------------------------------------------------------------ catalogue softmax
def test_global_log_softmax_equals_per_cluster_logsumexp_combined():
    torch.manual_seed(0)
    part = toy_partition()
    logits = torch.randn(6, N_ITEMS, dtype=torch.float64) * 5
    parts = [torch.logsumexp(logits[:, torch.from_numpy(part.items_of(c))], 1)
             for c in range(part.n_clusters)]
    lse = combine_logsumexp(parts)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))
    torch.testing.assert_close(logits - lse[:, None], F.log_softmax(logits, 1))


@pytest.mark.parametrize("chunk", [65536, 4])
@pytest.mark.parametrize("out_dims", ["[]", "[8]"])
def test_multinomial_loss_cluster_by_cluster_equals_log_softmax(out_dims, chunk):
    # chunk 4: every cluster's logsumexp in checkpointed chunks of 4 items (and a remainder)
    model, _ = make_model(f"ldiffrec.out_dims={out_dims}", f"ldiffrec.logit_chunk={chunk}")
    model.eval()
    batch = batch_of(toy_csr(weights=True))
    zhat0 = torch.randn(batch.batch_size, model.latent_size, requires_grad=True)
    inputs = model.cluster_inputs(batch)

    nll = model.multinomial_nll(zhat0, inputs)
    grads = torch.autograd.grad(nll.mean(), [zhat0] + list(model.parameters()),
                                allow_unused=True)

    # the reference: dense logits in global order, log_softmax over all items
    logits = torch.empty(batch.batch_size, N_ITEMS)
    for c in range(model.n_clusters):
        logits = logits.index_copy(1, model.items_of(c), model.cluster_logits(c, zhat0))
    ref = -(F.log_softmax(logits, 1) * batch.dense()).sum(1)
    ref_grads = torch.autograd.grad(ref.mean(), [zhat0] + list(model.parameters()),
                                    allow_unused=True)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # the parts combine the same way by hand
    picked = total = 0
    lses = []
    for c, inp in enumerate(inputs):
        p, t, l = model.multinomial_parts(model.cluster_hidden(c, zhat0),
                                          *model.cluster_weight(c), inp)
        picked, total = picked + p, total + t
        lses.append(l)
    torch.testing.assert_close(combine_multinomial(picked, total, combine_logsumexp(lses)), nll)


def test_chunked_logsumexp_equals_logsumexp_with_gradients():
    from scale_diffrec.models.linear_logsumexp import chunked_logsumexp
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(23, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, generator=g, dtype=torch.float64)
    ref = torch.logsumexp(h @ w.T + b, 1)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [h, w, b])
    for chunk in (1, 4, 23, 100):
        got = chunked_logsumexp(h, w, b, chunk)
        torch.testing.assert_close(got, ref)
        for a, r in zip(torch.autograd.grad((got * upstream).sum(), [h, w, b]), ref_grads):
            torch.testing.assert_close(a, r)


def test_residual_denoiser_starts_as_the_identity_and_learns():
    model, cfg = make_model("denoiser.residual=true", "ldiffrec.n_clusters=1",
                            partition=Partition.single(N_ITEMS))
    plain, _ = make_model("ldiffrec.n_clusters=1", partition=Partition.single(N_ITEMS))
    model.train()
    batch = batch_of(toy_csr())
    _, mu, _, _ = model.encode(batch)
    t = torch.arange(N_USERS) % 5
    assert torch.equal(model.denoiser(mu, t), mu)              # x_t + 0
    assert not torch.allclose(plain.denoiser(mu, t), mu)       # the reference's is not
    model.training_loss(batch, Progress(0, 0))["loss"].backward()
    last = model.denoiser.last_layer
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    # export and score read the same residual query: score == heads
    queries, (head,) = model.query(batch), model.item_heads()
    torch.testing.assert_close(model.score(batch), queries["items"] @ head.weight.T + head.bias)


def test_chunked_logsumexp_with_a_frozen_weight_gives_the_hidden_gradient_alone():
    from scale_diffrec.models.linear_logsumexp import chunked_logsumexp
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 3, generator=g, dtype=torch.float64)
    b = torch.randn(23, generator=g, dtype=torch.float64)
    upstream = torch.randn(5, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((torch.logsumexp(h @ w.T + b, 1) * upstream).sum(), h)[0]
    for chunk in (4, 23):
        got = torch.autograd.grad((chunked_logsumexp(h, w, b, chunk) * upstream).sum(), h)[0]
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("out_dims", ["[]", "[8]"])
def test_frozen_autoencoder_epochs_train_the_denoiser_alone_then_everything(out_dims):
    model, cfg = make_model("ldiffrec.frozen_autoencoder_epochs=2", f"ldiffrec.out_dims={out_dims}")
    joint, _ = make_model(f"ldiffrec.out_dims={out_dims}")
    joint.load_state_dict(model.state_dict())
    batch = batch_of(toy_csr(weights=True))
    opt = torch.optim.AdamW(parameter_groups(model, cfg))
    auto = {n for n, _ in model.named_parameters() if not n.startswith("denoiser")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    joint.train()
    for step, epoch in enumerate([0, 1, 2]):
        opt.zero_grad(set_to_none=True)
        loss = model.training_loss(batch, Progress(epoch=epoch, step=step))["loss"]
        if step == 0:           # the loss itself does not depend on the freezing
            torch.testing.assert_close(loss, joint.training_loss(batch, Progress(0, 0))["loss"])
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == (set(before) - auto if epoch < 2 else set(before))
        opt.step()
        if epoch == 1:
            for n in auto:
                assert torch.equal(model.get_parameter(n), before[n]), n
            assert all(not torch.equal(model.get_parameter(n), before[n])
                       for n in before if n.startswith("denoiser.") and n.endswith("weight"))
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in auto
               if n.endswith("weight"))


@pytest.mark.parametrize("out_dims", ["[]", "[8]"])
@pytest.mark.parametrize("owned", [[1], [0, 2]])
def test_cluster_parts_built_alone_equal_the_whole_models(out_dims, owned):
    # a worker builds only its clusters' parts (a Shard of a 2-worker plan): the values
    # must be those of the model built whole, whatever the global RNG holds
    from scale_diffrec.shard.plan import Plan
    from scale_diffrec.shard.context import Shard
    model, cfg = make_model(f"ldiffrec.out_dims={out_dims}", seed=0)
    torch.manual_seed(123)
    rest = [c for c in range(3) if c not in owned]
    plan = Plan(toy_partition().sizes.tolist(), [owned, rest], latent_dims=model.latent_sizes)
    shell = LDiffRec.from_config(cfg, N_ITEMS, toy_partition(), shard=Shard(plan, 0))
    assert shell.encoders.clusters() == owned
    assert (shell.decoder is None) == bool(shell.decoders)
    for c in owned:
        for name, p in shell.encoders[c].state_dict().items():
            assert torch.equal(p, model.encoders[c].state_dict()[name]), (c, name)
        if model.global_decoder:
            rows = shell.decoder_rows(c)
            assert torch.equal(shell.decoder.weight[rows],
                               model.decoder.weight[model.items_of(c)].detach())
            assert torch.equal(shell.decoder.bias[rows],
                               model.decoder.bias[model.items_of(c)].detach())
        else:
            for name, p in shell.decoders[c].state_dict().items():
                assert torch.equal(p, model.decoders[c].state_dict()[name]), (c, name)
    # the same parameter names as the whole model's (a row shard of decoder.weight)
    assert set(shell.state_dict()) <= set(model.state_dict())
    assert not torch.equal(model.encoders[0].first.weight[:2], model.encoders[1].first.weight[:2])
    other, _ = make_model(f"ldiffrec.out_dims={out_dims}", "seed=4")
    assert not torch.equal(other.encoders[0].first.weight, model.encoders[0].first.weight)


def test_global_decoder_rows_have_the_whole_linears_xavier_scale():
    part = Partition(np.arange(20000) % 4, 4)
    cfg = make_cfg("ldiffrec.n_clusters=4", "ldiffrec.in_dims=[40]")
    model = LDiffRec.from_config(cfg, 20000, part)
    std = (2.0 / (40 + 20000)) ** 0.5
    assert model.decoder.weight.std().item() == pytest.approx(std, rel=0.01)
    assert torch.count_nonzero(model.decoder.bias) == 0


def test_global_decoder_cluster_logits_are_its_weight_rows():
    model, _ = make_model()
    z = torch.randn(4, model.latent_size)
    full = model.decoder(z)
    for c in range(model.n_clusters):
        torch.testing.assert_close(model.cluster_logits(c, z), full[:, model.items_of(c)])


# ------------------------------------------------------------------ annealing
def test_lamda_and_beta_annealing_values():
    l = make_cfg()["ldiffrec"]
    T = LDiffRecConfig.model_validate          # the typed section the model reads
    assert (l["lamda"], l["anneal_cap"], l["anneal_steps"]) == (0.03, 0.005, 500)
    assert (l["vae_anneal_cap"], l["vae_anneal_steps"]) == (0.3, 200)
    assert lamda_at(T(l), 0) == pytest.approx(0.03)
    assert lamda_at(T(l), 100) == pytest.approx(0.024)          # (1 - 100/500) * 0.03
    assert lamda_at(T(l), 400) == pytest.approx(0.006)          # (1 - 400/500) * 0.03
    assert lamda_at(T(l), 450) == pytest.approx(0.005)          # 0.003 -> the cap 0.005
    assert lamda_at(T(l), 10_000) == pytest.approx(0.005)
    assert beta_at(T(l), 0) == 0.0
    assert beta_at(T(l), 50) == pytest.approx(0.25)             # 50 / 200
    assert beta_at(T(l), 60) == pytest.approx(0.3)              # 0.3 cap
    assert beta_at(T(l), 5000) == pytest.approx(0.3)
    assert lamda_at(T({**l, "anneal_steps": 0}), 7) == 0.03
    assert beta_at(T({**l, "vae_anneal_steps": 0}), 7) == 0.3

    model, _ = make_model()
    batch = batch_of(toy_csr())
    terms = model.training_loss(batch, Progress(epoch=100, step=50))
    assert terms["lamda"].item() == pytest.approx(0.024)
    assert terms["beta"].item() == pytest.approx(0.25)
    expected = 0.024 * terms["diffusion"] + terms["recon"] + 0.25 * terms["kl"]
    torch.testing.assert_close(terms["loss"].detach(), expected)


# ------------------------------------------------------------------ both decoder forms
@pytest.mark.parametrize("n_clusters,out_dims", [(3, "[]"), (3, "[8]"), (1, "[]"), (1, "[8]")])
def test_train_step_score_and_heads(n_clusters, out_dims):
    part = toy_partition() if n_clusters == 3 else Partition.single(N_ITEMS)
    model, cfg = make_model(f"ldiffrec.n_clusters={n_clusters}", f"ldiffrec.out_dims={out_dims}",
                            partition=part)
    csr = toy_csr(weights=True)
    batch = batch_of(csr)
    opt = torch.optim.AdamW(parameter_groups(model, cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for step in range(3):
        opt.zero_grad()
        terms = model.training_loss(batch, Progress(epoch=0, step=step))
        assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
        terms["loss"].backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("encoders") for n in changed)
    assert any(n.startswith("denoiser") for n in changed)
    assert any(n.startswith("decoder") for n in changed)
    assert model.training                                  # score leaves the mode alone

    scores = model.score(batch)
    assert model.training
    assert scores.shape == (N_USERS, N_ITEMS) and torch.isfinite(scores).all()
    assert torch.equal(scores, model.score(batch))         # deterministic
    # score == heads, exactly
    queries, heads = model.query(batch), model.item_heads()
    if out_dims == "[]":
        assert [h.name for h in heads] == ["items"]
    else:
        assert [h.name for h in heads] == [f"cluster{c}" for c in range(n_clusters)]
    covered = torch.cat([h.items for h in heads])
    assert torch.equal(torch.sort(covered).values, torch.arange(N_ITEMS))
    for h in heads:
        assert queries[h.name].shape == (N_USERS, h.weight.shape[1])
        assert torch.equal(scores[:, h.items], queries[h.name] @ h.weight.T + h.bias)
    # the query is zhat0 (global decoder) or, per cluster with a single-Linear D_c, zhat0_c
    model.eval()
    _, mu, _, _ = model.encode(batch)
    zhat0 = model.diffusion.p_sample(model.denoiser, mu, 0, False)
    if out_dims == "[]":
        assert torch.equal(queries["items"], zhat0)
    elif n_clusters == 3:
        for c in range(3):
            assert torch.equal(queries[f"cluster{c}"], zhat0[:, model.latent_slice(c)])


def test_score_is_decode_of_denoised_mu():
    model, _ = make_model()
    model.eval()
    batch = batch_of(toy_csr())
    _, mu, _, z = model.encode(batch)
    assert torch.equal(mu, z)                              # eval: z = mu
    zhat0 = model.diffusion.p_sample(model.denoiser, mu, model.sampling_steps,
                                     model.sampling_noise)
    torch.testing.assert_close(model.score(batch), model.decoder(zhat0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reparam", [True, False])
def test_reparam_false_trains_on_mu_and_keeps_the_kl(reparam):
    model, _ = make_model(f"ldiffrec.reparam={str(reparam).lower()}")
    model.train()
    batch = batch_of(toy_csr())
    gens = [model.cluster_generator(7, c, "cpu") for c in range(3)]
    _, mu, logvar, z = model.encode(batch, gens)
    assert torch.equal(z, mu) is not reparam
    assert float(model.kl_sum(mu, logvar).abs().sum()) > 0   # the KL term is still there


def test_training_noise_is_keyed_by_seed_step_and_cluster():
    model, _ = make_model()
    model.train()
    batch = batch_of(toy_csr())
    gens = [model.cluster_generator(7, c, "cpu") for c in range(3)]
    _, _, _, z1 = model.encode(batch, gens)
    gens = [model.cluster_generator(7, c, "cpu") for c in range(3)]
    _, _, _, z2 = model.encode(batch, gens)
    assert torch.equal(z1, z2)
    gens = [model.cluster_generator(8, c, "cpu") for c in range(3)]
    _, _, _, z3 = model.encode(batch, gens)
    assert not torch.equal(z1, z3)
    # a cluster's stream does not depend on the others
    sl = model.latent_slice(1)
    gens = [model.cluster_generator(8, 0, "cpu"), model.cluster_generator(7, 1, "cpu"),
            model.cluster_generator(9, 2, "cpu")]
    _, _, _, z4 = model.encode(batch, gens)
    assert torch.equal(z4[:, sl], z1[:, sl])


def test_build_model_and_checkpoint_round_trip():
    cfg = make_cfg()
    part = toy_partition()
    torch.manual_seed(0)
    model = build_model(cfg, N_ITEMS, part)
    assert isinstance(model, LDiffRec)
    state = model.state_dict()
    assert not any(k.startswith(("cluster_of", "local_of", "items_")) for k in state)
    torch.manual_seed(1)
    other = build_model(cfg, N_ITEMS, part)
    other.load_state_dict(state)
    batch = batch_of(toy_csr())
    assert torch.equal(model.score(batch), other.score(batch))


# ------------------------------------------------------------------ real data
@pytest.mark.skipif(not ML1M.is_dir(), reason=f"DiffRec data not present at {ML1M}")
def test_ml1m_clean_one_batch():
    pairs = np.load(ML1M / "train_list.npy")
    emb = np.load(ML1M / "item_emb.npy")
    n_users, n_items = int(pairs[:, 0].max()) + 1, emb.shape[0]
    train = CSR.from_pairs(pairs[:, 0], pairs[:, 1], n_users, n_items)
    cfg = load_config(None, ["model=ldiffrec", "seed=1", "ldiffrec.lr_vae=0.001", "lr=0.0005",
                             "diffusion.steps=40", "diffusion.noise_scale=0.005",
                             "diffusion.noise_min=0.005", "diffusion.noise_max=0.02"])
    part = Partition.kmeans(emb, cfg["ldiffrec"]["n_clusters"], seed=cfg["seed"])
    torch.manual_seed(1)
    model = LDiffRec.from_config(cfg, n_items, part)
    assert model.latent_size == 300 and len(model.latent_sizes) == 2
    assert model.latent_sizes[0] == int(part.sizes[0] / n_items * 300)
    batch = train.take_rows(np.arange(400)).to_torch()
    opt = torch.optim.AdamW(parameter_groups(model, cfg))
    model.train()
    terms = model.training_loss(batch, Progress())
    terms["loss"].backward()
    opt.step()
    # at step 0: beta = 0, lamda = 0.03; recon dominates (about log(2810) per interaction)
    assert terms["beta"].item() == 0.0 and terms["lamda"].item() == pytest.approx(0.03)
    per_item = terms["recon"].item() / (batch.values.sum().item() / 400)
    assert 0.5 * np.log(n_items) < per_item < 2 * np.log(n_items)
    scores = model.score(batch)
    assert scores.shape == (400, n_items) and torch.isfinite(scores).all()


# ------------------------------------------------------------------ ALS warm start
def two_group_csr(n_users=60, n_items=30, seed=0):
    """Users 0..n/2-1 take only items 0..14, the others only items 15..29 (40% of each)."""
    rng = np.random.default_rng(seed)
    group = np.arange(n_users) >= n_users // 2
    own = (np.arange(n_items)[None, :] >= n_items // 2) == group[:, None]
    r, c = np.nonzero(own & (rng.random((n_users, n_items)) < 0.4))
    return CSR.from_pairs(r, c, n_users, n_items), own


@pytest.mark.parametrize("n_clusters,out_dims", [(1, "[]"), (3, "[]"), (3, "[8]")])
def test_als_warm_start_ranks_each_users_own_group_first(n_clusters, out_dims):
    # before any training, the autoencoder alone (mu -> decoder) must score every user's
    # unseen items of the own group above the other group's on average, as ALS does; the
    # paper's random initialisation does not
    pytest.importorskip("implicit")
    train, own = two_group_csr()
    part = Partition(np.arange(N_ITEMS) % n_clusters, n_clusters)
    for warm, expect in (("als", True), ("none", False)):
        cfg = make_cfg(f"ldiffrec.n_clusters={n_clusters}", f"ldiffrec.out_dims={out_dims}",
                       f"ldiffrec.warm_start={warm}", "ldiffrec.in_dims=[6]")
        model = LDiffRec.from_config(cfg, N_ITEMS, part, train=train).eval()
        with torch.no_grad():
            _, mu, _, _ = model.encode(batch_of(train))
            logits = torch.empty(train.n_rows, N_ITEMS)
            for c in range(n_clusters):
                logits[:, model.items_of(c)] = model.cluster_logits(c, mu)
        unseen_own = torch.from_numpy(own & (train.to_torch().dense().numpy() == 0)).float()
        other = torch.from_numpy(~own).float()
        mean_own = (logits * unseen_own).sum(1) / unseen_own.sum(1)
        mean_other = (logits * other).sum(1) / other.sum(1)
        assert bool((mean_own > mean_other).all()) is expect, (warm, n_clusters, out_dims)


def test_als_warm_start_scales_and_gain():
    pytest.importorskip("implicit")
    from scale_diffrec.embeddings import als_factors, als_warm_start
    train, _ = two_group_csr(n_users=80)
    enc, dec = als_warm_start(train, 4, 0.1, 10.0, 15, seed=0)
    assert enc.shape == dec.shape == (N_ITEMS, 4)
    pre = train.to_torch().dense().numpy() @ enc                    # tanh's input, [users, 4]
    assert np.sqrt((pre ** 2).mean()) == pytest.approx(0.5, rel=0.25)
    # the decoder is the item factors times one gain: parallel rows, and a gain that is the
    # best of the grid (halving or doubling it raises the multinomial loss)
    y, x = als_factors(train, 4, 0.1, 10.0, 15, seed=0)
    ratio = dec / y
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)

    def loss(scale):
        logits = torch.from_numpy(x @ y.T).double() * scale
        return float(-(torch.from_numpy(train.to_torch().dense().numpy()).double()
                       * torch.log_softmax(logits, 1)).sum(1).mean())
    from scale_diffrec.embeddings import _logit_gain
    g = _logit_gain(train, torch.from_numpy(x).double(), torch.from_numpy(y).double(), 256)
    assert loss(g) < loss(g / 2) and loss(g) < loss(g * 2)


def test_als_warm_start_parts_built_alone_equal_the_whole_models():
    pytest.importorskip("implicit")
    train, _ = two_group_csr()
    cfg = make_cfg("ldiffrec.warm_start=als")
    model = LDiffRec.from_config(cfg, N_ITEMS, toy_partition(), train=train)
    from scale_diffrec.shard.plan import Plan
    from scale_diffrec.shard.context import Shard
    plan = Plan(toy_partition().sizes.tolist(), [[0, 2], [1]], latent_dims=model.latent_sizes)
    shell = LDiffRec.from_config(cfg, N_ITEMS, toy_partition(), train=train,
                                 shard=Shard(plan, 0))          # a worker: clusters 0 and 2
    for c in (2, 0):
        factors = shell.warm_factors(c)
        assert torch.equal(shell.new_encoder(c, factors).first.weight,
                           model.encoders[c].first.weight)
        assert torch.equal(shell.new_decoder(c, factors).weight,
                           model.decoder.weight[model.items_of(c)].detach())
    # without a train matrix (a checkpoint's weights follow) the paper's init is kept
    kept = LDiffRec.from_config(cfg, N_ITEMS, toy_partition())
    assert kept.warm_factors(0) is None


@pytest.mark.parametrize("extra,key", [(["ldiffrec.warm_start=svd"], "ldiffrec.warm_start"),
                                       (["ldiffrec.warm_start=als", "ldiffrec.in_dims=[12,20]"],
                                        "ldiffrec.warm_start"),
                                       (["ldiffrec.warm_start=als", "ldiffrec.als_iters=0"],
                                        "ldiffrec.als_iters")])
def test_warm_start_config_errors_name_the_key(extra, key):
    from scale_diffrec.errors import ConfigError
    train, _ = two_group_csr()
    with pytest.raises(ConfigError, match=key):
        LDiffRec.from_config(make_cfg(*extra), N_ITEMS, toy_partition(), train=train)
