"""DESIGN.md's invariant for every model setting: flat index == brute force == evaluate's
ranking, or export refuses the setting in one line and writes nothing.

The combinations (model x decoder form x mean_type x schedule x sampling_steps / sampling
noise) are enumerated on untrained models (random weights rank as well as trained ones for this;
the noised settings' draws are keyed by each row, ``models/row_noise.py``, so no RNG set-up);
the one setting whose score is not a linear head (DiffRec predicting the noise from a
noised start) must be refused."""
import itertools

import numpy as np
import pytest
import torch

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.data import load_data
from scale_diffrec.errors import ConfigError
from scale_diffrec.choices import Schedule
from scale_diffrec.evaluate import evaluate, evaluate_topk, topk_excluding
from scale_diffrec.models import build_model
from scale_diffrec.retrieval import Retriever, export
from scale_diffrec.runs import TrainedRun

BASE = ["data.source=synthetic", "data.synthetic.n_users=40", "data.synthetic.n_items=60",
        "data.synthetic.n_clusters=3", "data.synthetic.mean_items_per_user=8",
        "topk=[10, 20]", "denoiser.dims=[12]", "diffusion.steps=6", "multvae.dims=[6, 10]",
        "ldiffrec.n_clusters=3", "ldiffrec.in_dims=[9]", "ldiffrec.mlp_dims=[8]",
        "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=4", "eval_batch_size=1000"]
FORMS = {"diffrec": ["model=diffrec"], "ldiffrec-global": ["model=ldiffrec"],
         "ldiffrec-clusters": ["model=ldiffrec", "ldiffrec.out_dims=[5]"],
         "t-diffrec": ["model=diffrec", "data.time_weights={w_min: 0.1, w_max: 1.0}"]}
# the schedules (noise_scale 0, no noise, is refused by the config schema: every beta must
# lie in (0, 1))
SCHEDULES = [s.value for s in Schedule]
SCHEDULE_SETTINGS = {s: [f"diffusion.schedule={s}"] for s in SCHEDULES}
SCHEDULE_SETTINGS["trunc_lin"] += ["diffusion.steps=25"]      # fewer steps: betas above 1
STARTS = {"T'0": [], "T'2": ["diffusion.sampling_steps=2"],
          "sampling-noise": ["diffusion.sampling_noise=true"]}


def settings(full: bool):
    """Every combination (``full``), or every one for DiffRec (the model whose score is
    built from its outputs) and the other forms with the default schedule."""
    yield "multvae", ["model=multvae"]
    for (form, extra), mean, (schedule, sched), (start, noise) in itertools.product(
            FORMS.items(), ("x0", "eps"), SCHEDULE_SETTINGS.items(), STARTS.items()):
        if full or form == "diffrec" or schedule == "linear-var":
            yield (f"{form}-{mean}-{schedule}-{start}",
                   extra + [f"diffusion.mean_type={mean}"] + sched + noise)


def not_linear(cfg) -> bool:
    """DiffRec predicting the noise from a noised start: its score holds the noise."""
    d = cfg["diffusion"]
    return cfg["model"] == "diffrec" and d["mean_type"] == "eps" and d["noise_scale"] != 0 \
        and (d["sampling_steps"] > 0 or d["sampling_noise"])


pytestmark = pytest.mark.usefixtures("one_thread")     # tiny matrices (conftest)


def test_every_setting_is_exact_or_refused(tmp_path):
    check_settings(tmp_path, full=False)


@pytest.mark.slow
def test_every_combination_is_exact_or_refused(tmp_path):
    check_settings(tmp_path, full=True)


def check_settings(tmp_path, full: bool):
    datasets, partition = {}, None
    checked = refused = 0
    for name, extra in settings(full):
        cfg = load_config(None, BASE + extra)
        key = str(cfg["data"]["time_weights"])
        if key not in datasets:
            datasets[key] = load_data(cfg)
        data = datasets[key]
        if cfg["model"] == "ldiffrec" and partition is None:
            from scale_diffrec.partition import build_partition
            partition = build_partition(cfg, data)
        torch.manual_seed(0)
        model = build_model(cfg, data.n_items, partition if cfg["model"] == "ldiffrec" else None)
        model.eval()
        run = TrainedRun(tmp_path / "run", cfg, data, model, partition)
        out = tmp_path / name
        if not_linear(cfg):
            with pytest.raises(ConfigError, match="not a linear head") as err:
                export(run, out)
            assert "\n" not in str(err.value) and not out.exists()
            refused += 1
            continue
        retriever = Retriever.load(export(run, out))
        rows = data.train
        items, scores = retriever.recommend_indexes(rows, 20)
        brute, brute_scores = retriever.recommend_indexes(rows, 20, brute_force=True)
        ref, ref_scores = topk_excluding(model.score(rows.to_torch()), rows, 20)
        tol = 1e-5 * max(1.0, float(np.abs(ref_scores.numpy()).max()))
        for got, got_scores in ((items, scores), (brute, brute_scores)):
            np.testing.assert_allclose(got_scores, ref_scores.numpy(), rtol=1e-5, atol=tol,
                                       err_msg=name)
            assert (got == ref.numpy()).mean() > 0.99, name      # only float ties may swap
        via_index = evaluate_topk(items, data, "valid", ks=[10, 20])
        direct = evaluate(model, data, "valid", ks=[10, 20])
        assert via_index["recall@20"] == pytest.approx(direct["recall@20"], abs=1e-9), name
        if cfg["model"] == "diffrec":
            # held items too (--include-seen): the index path still equals brute force
            free, free_scores = retriever.recommend_indexes(rows, 20, exclude_seen=False)
            bf, bf_scores = retriever.recommend_indexes(rows, 20, exclude_seen=False,
                                                        brute_force=True)
            np.testing.assert_allclose(free_scores, bf_scores, rtol=1e-5, atol=tol,
                                       err_msg=name)
            assert (free == bf).mean() > 0.99, name
        checked += 1
    # refused: DiffRec and T-DiffRec with eps, a noised start or sampling noise, and a
    # schedule (every one; T-DiffRec's only linear-var unless full)
    assert refused == (2 * len(SCHEDULES) if full else len(SCHEDULES) + 1) * 2
    assert checked + refused == len(list(settings(full)))


def test_eps_diffrec_had_a_wrong_head_before(tmp_path):
    """The reproducer: the raw last layer ranks eps-DiffRec's items against its scores
    (the rebuilt x0 has a negative slope in the predicted noise)."""
    cfg = load_config(None, BASE + FORMS["diffrec"] + ["diffusion.mean_type=eps"])
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.n_items).eval()
    rows = data.train.to_torch()
    raw = model.denoiser.last_layer
    (query,) = model.query(rows).values()
    (head,) = model.item_heads()
    scores = model.score(rows)
    unseen = rows.dense() == 0
    linear = query @ head.weight.T + head.bias
    assert torch.allclose(linear[unseen], scores[unseen], rtol=1e-5, atol=1e-6)
    wrong = model._hiddens(rows)[-1] @ raw.weight.T + raw.bias
    assert torch.corrcoef(torch.stack([wrong[unseen], scores[unseen]]))[0, 1] < 0


def test_cli_export_refuses_a_non_linear_setting_in_one_line(tmp_path, capsys):
    from scale_diffrec.train import train
    cfg = load_config(None, BASE + FORMS["diffrec"] + ["diffusion.mean_type=eps",
                                                       "diffusion.sampling_steps=2",
                                                       "epochs=1", "batch_size=20"])
    train(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export") and err.count("\n") == 1
    assert "sampling_steps=0" in err and not (tmp_path / "b").exists()
