"""Inference with T' > 0 or sampling noise is deterministic (``models/row_noise.py``): each
user's noise is keyed by (seed, the user's input row), so evaluating twice, with another
batch size, on W gloo workers, or through the exported bundle's query tower gives the same
scores. (The reference draws it from torch's global RNG: each of these differed before.)"""
import numpy as np
import pytest
import torch

from scale_diffrec.config import load_config
from scale_diffrec.data import load_data
from scale_diffrec.evaluate import evaluate, topk_excluding
from scale_diffrec.models import build_model
from scale_diffrec.partition import Partition
from scale_diffrec.train.distributed.local import run_distributed

BASE = ["data.source=synthetic", "data.synthetic.n_users=50", "data.synthetic.n_items=40",
        "data.synthetic.n_clusters=3", "data.synthetic.mean_items_per_user=7", "seed=4",
        "topk=[10, 20]", "denoiser.dims=[12]", "diffusion.steps=6", "ldiffrec.n_clusters=3",
        "ldiffrec.in_dims=[9]", "ldiffrec.mlp_dims=[8]"]
MODELS = {"diffrec": ["model=diffrec"], "ldiffrec": ["model=ldiffrec"],
          "ldiffrec-clusters": ["model=ldiffrec", "ldiffrec.out_dims=[5]"]}
NOISE = {"T'3": ["diffusion.sampling_steps=3"],
         "T'3+sampling-noise": ["diffusion.sampling_steps=3", "diffusion.sampling_noise=true"]}
SIZES = [18, 14, 8]                 # uneven clusters, as test_sharded


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny matrices (conftest)


def _setup(overrides):
    cfg = load_config(None, BASE + list(overrides))
    data = load_data(cfg)
    cluster_of = np.repeat(np.arange(len(SIZES)), SIZES)
    partition = Partition(np.random.default_rng(0).permutation(cluster_of), len(SIZES))
    return cfg, data, partition


def _model(cfg, data, partition, shard=None):
    torch.manual_seed(0)             # the same weights on every call and every rank
    return build_model(cfg, data.n_items, partition, shard=shard).eval()


def _scores(model, data, users):
    return model.score(data.train.take_rows(users).to_torch())


@pytest.mark.parametrize("noise", list(NOISE))
@pytest.mark.parametrize("form", list(MODELS))
def test_evaluating_twice_and_in_other_batches_gives_the_same_scores(form, noise):
    cfg, data, partition = _setup(MODELS[form] + NOISE[noise])
    model = _model(cfg, data, partition)
    users = np.arange(data.n_users)
    torch.manual_seed(1)
    first = _scores(model, data, users)
    torch.manual_seed(2)            # the global RNG is not what the noise comes from
    assert torch.equal(first, _scores(model, data, users))
    # batches of 7 users, in reverse order: each user's scores as in the one batch
    parts = [_scores(model, data, users[s:s + 7]) for s in range(0, len(users), 7)[::-1]]
    torch.testing.assert_close(torch.cat(parts[::-1]), first, rtol=1e-6, atol=1e-6)
    one = evaluate(model, data, "valid", ks=[10, 20], batch_size=1000)
    assert one == evaluate(model, data, "valid", ks=[10, 20], batch_size=1000)
    small = evaluate(model, data, "valid", ks=[10, 20], batch_size=7)
    for key in ("recall@10", "recall@20", "ndcg@20"):
        assert small[key] == pytest.approx(one[key], abs=1e-12), key
    # the noise is there: T' = 0 scores otherwise, and another seed draws other noise
    clean = _model(load_config(None, BASE + MODELS[form]), data, partition)
    clean.load_state_dict(model.state_dict())
    assert not torch.allclose(_scores(clean, data, users), first, atol=1e-4)
    reseeded = _model(load_config(None, BASE + MODELS[form] + NOISE[noise] + ["seed=5"]),
                      data, partition)
    reseeded.load_state_dict(model.state_dict())
    assert not torch.allclose(_scores(reseeded, data, users), first, atol=1e-4)


@pytest.mark.parametrize("form", list(MODELS))
def test_the_exported_bundle_scores_as_the_model_with_noisy_inference(form, tmp_path):
    from scale_diffrec.retrieval import Retriever, export
    from scale_diffrec.runs import TrainedRun
    cfg, data, partition = _setup(MODELS[form] + NOISE["T'3+sampling-noise"])
    model = _model(cfg, data, partition)
    run = TrainedRun(tmp_path / "run", cfg, data, model, partition)
    retriever = Retriever.load(export(run, tmp_path / "index"))
    users = np.array([31, 4, 17, 9, 44])             # another batch than the model's
    torch.manual_seed(3)
    items, scores = retriever.recommend_indexes(data.train.take_rows(users), 10)
    torch.manual_seed(4)
    whole = model.score(data.train.to_torch())[users]
    ref, ref_scores = topk_excluding(whole, data.train.take_rows(users), 10)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-5)
    assert (items == ref.numpy()).mean() > 0.95           # only float ties may swap


def _sharded_evaluation(rank, world, overrides):
    """Rank's (valid metrics, scores of every user) of the model sharded on ``world``
    gloo processes (no DeepSpeed: evaluation runs the plain denoiser)."""
    from scale_diffrec.shard.context import Shard
    from scale_diffrec.train.distributed.trainer import build_plan
    cfg, data, partition = _setup(overrides)
    shard = Shard.of_process_group(build_plan(cfg, partition, world))
    model = _model(cfg, data, partition, shard)
    queries = model.query(data.train.to_torch())
    return (evaluate(model, data, "valid", ks=[10, 20], batch_size=16),
            {name: q for name, q in queries.items()})


@pytest.mark.parametrize("form", ["ldiffrec", "ldiffrec-clusters"])
def test_w_workers_evaluate_as_one_process_with_noisy_inference(form):
    overrides = MODELS[form] + NOISE["T'3+sampling-noise"]
    cfg, data, partition = _setup(overrides)
    model = _model(cfg, data, partition)
    metrics = evaluate(model, data, "valid", ks=[10, 20], batch_size=16)
    queries = model.query(data.train.to_torch())
    results = run_distributed(_sharded_evaluation, 2, args=(overrides,), timeout=240)
    for sharded, sharded_queries in results:
        for key in ("recall@10", "recall@20", "ndcg@20"):
            assert sharded[key] == pytest.approx(metrics[key], abs=1e-9), key
        for name, q in sharded_queries.items():
            torch.testing.assert_close(q, queries[name], rtol=1e-5, atol=1e-6, msg=name)
