"""Baselines: scores equal hand-computed values on tiny matrices; EASE refuses large
catalogues before writing anything; the one training loop fits them and writes a run that
`evaluate` and (for linear heads) `export` use; ALS's flat bundle == brute force ==
the evaluation ranking; ItemKNN / EASE are refused by export in one line."""
import math

import numpy as np
import pytest
import torch

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.data.csr import CSR
from scale_diffrec.errors import ConfigError
from scale_diffrec.evaluate import evaluate, topk_excluding
from scale_diffrec.models import build_model
from scale_diffrec.models.baselines import EASE, ItemKNN, MostPopular
from scale_diffrec.retrieval import Retriever, export
from scale_diffrec.runs import load_run
from scale_diffrec.train import train

# 4 users x 4 items:      item 0  1  2  3
X_ROWS = [[0, 1], [0, 1, 2], [1, 2], [3]]
TINY = ["data.source=synthetic", "data.synthetic.n_users=150", "data.synthetic.n_items=90",
        "data.synthetic.n_clusters=3", "data.synthetic.mean_items_per_user=10",
        "topk=[10, 20]", "als.factors=8", "itemknn.k=10"]


def _csr(rows, n_items=4):
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return CSR.from_pairs(np.array(r, np.int64), np.array(c, np.int64), len(rows), n_items)


def test_most_popular_scores_are_train_counts_and_export_as_one_head():
    model = MostPopular(4)
    model.fit(_csr(X_ROWS))
    scores = model.score(_csr([[0], [3]]).to_torch())
    assert scores.tolist() == [[2.0, 3.0, 2.0, 1.0]] * 2           # users per item, by hand
    (head,) = model.item_heads()
    query = model.query(_csr([[0]]).to_torch())["items"]
    assert torch.equal(query @ head.weight.T + head.bias, scores[:1])


def test_itemknn_scores_equal_hand_computed_shrunk_cosine_with_top_k():
    # co-occurrence: (0,1) 2 users, (1,2) 2, (0,2) 1; |item| = sqrt(users): 2, 3, 2, 1
    shrink = 1.0
    sim = {(0, 1): 2 / (math.sqrt(2 * 3) + shrink), (1, 2): 2 / (math.sqrt(3 * 2) + shrink),
           (0, 2): 1 / (math.sqrt(2 * 2) + shrink)}
    sim.update({(j, i): v for (i, j), v in list(sim.items())})
    # k = 1: item 0's nearest is 1, item 1's is 0 or 2 (tied: either), item 2's is 1;
    # item 3 has no neighbour. A history {0} scores j by sim(0, j) where 0 is j's neighbour.
    model = ItemKNN(4, k=1, shrink=shrink)
    model.fit(_csr(X_ROWS))
    s = model.score(_csr([[0], [1, 3]]).to_torch()).numpy()
    neighbour_of_1 = 0 if s[0, 1] > 0 else 2
    expect = np.zeros((2, 4))
    expect[0, 1] = sim[0, 1] if neighbour_of_1 == 0 else 0.0
    expect[1, 0] = sim[1, 0]
    expect[1, 2] = sim[1, 2]
    np.testing.assert_allclose(s, expect, rtol=1e-6)
    # k = 2 keeps every co-occurring pair: history {0} -> [0, sim01, sim02, 0]
    model = ItemKNN(4, k=2, shrink=shrink)
    model.fit(_csr(X_ROWS))
    s = model.score(_csr([[0]]).to_torch()).numpy()
    np.testing.assert_allclose(s, [[0.0, sim[0, 1], sim[0, 2], 0.0]], rtol=1e-6)


def test_itemknn_blocks_and_chunks_do_not_change_the_result():
    rng = np.random.default_rng(0)
    x = CSR.from_pairs(rng.integers(0, 60, 900), rng.integers(0, 40, 900), 60, 40)
    one = ItemKNN(40, k=5, shrink=2.0)
    one.fit(x)
    many = ItemKNN(40, k=5, shrink=2.0, block_pairs=7)        # blocks of one or two items
    many.fit(x)
    batch = x.take_rows(np.arange(10)).to_torch()
    full = one.score(batch)
    torch.testing.assert_close(many.score(batch), full)
    chunks = list(one.score_chunks(batch, 7))
    assert torch.cat([c for c, _ in chunks], 1).equal(full)
    assert torch.cat([i for _, i in chunks]).tolist() == list(range(40))
    assert (one.neighbour_indptr.diff() <= 40).all()
    per_target = np.bincount(one.neighbour_items.numpy(), minlength=40)
    assert per_target.max() <= 5                                  # k neighbours per item


def test_ease_equals_the_closed_form_by_hand():
    # two items: G = X^T X + lamda I = [[a + l, c], [c, b + l]];
    # B_01 = -P_01 / P_11 = c / (a + l), B_10 = c / (b + l), diag 0 (Steck 2019, eq. 8)
    x = _csr([[0, 1], [0], [0, 1], [1]], n_items=2)       # a = 3, b = 3, c = 2
    lamda = 2.0
    model = EASE(2, lamda)
    model.fit(x)
    np.testing.assert_allclose(model.weights.numpy(), [[0, 2 / 5], [2 / 5, 0]], rtol=1e-6)
    x = _csr([[0, 1], [0], [0]], n_items=2)                # a = 3, b = 1, c = 1
    model.fit(x)
    np.testing.assert_allclose(model.weights.numpy(), [[0, 1 / 5], [1 / 3, 0]], rtol=1e-6)
    scores = model.score(_csr([[0], [0, 1]], n_items=2).to_torch())
    np.testing.assert_allclose(scores.numpy(), [[0, 1 / 5], [1 / 3, 1 / 5]], rtol=1e-6)


def test_ease_refuses_a_catalogue_above_max_items_before_writing(tmp_path, capsys):
    cfg = load_config(None, TINY + ["model=ease", "ease.max_items=50"])
    with pytest.raises(ConfigError, match="ease.max_items.*90 items"):
        build_model(cfg, 90)
    out = tmp_path / "run"
    rc = main(["train", "--config", _write_config(tmp_path, TINY + ["model=ease",
                                                                    "ease.max_items=50"]),
               "--out", str(out)])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: config key 'ease.max_items'")
    assert not out.exists()


def _error_lines(capsys):
    """The CLI's 'error:' lines on stderr (log records of earlier tests may go there too:
    their handler holds a stream pytest has closed)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def _write_config(tmp_path, overrides):
    from scale_diffrec.config import save_config
    path = tmp_path / "config.yaml"
    save_config(load_config(None, overrides), path)
    return str(path)


@pytest.mark.parametrize("name", ["mostpop", "itemknn", "ease", "als"])
def test_one_fit_in_the_training_loop_and_the_run_reloads(tmp_path, name):
    metrics = train(load_config(None, TINY + [f"model={name}"]), tmp_path / name)
    assert metrics["best_epoch"] == 1 and len(metrics["history"]) == 1
    assert metrics["history"][0]["loss"] is None
    run = load_run(tmp_path / name)                 # buffers of fitted shapes load back
    fitted = sum(b.numel() for b in run.model.buffers())
    assert metrics["parameters"] == {"total": fitted} and fitted >= run.data.n_items
    again = evaluate(run.model, run.data, "test", ks=(10, 20))
    for key in ("recall@20", "ndcg@20"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-12)
    # well above chance (20 / 90): the synthetic data has popularity and clusters
    assert metrics["test"]["recall@20"] > 1.5 * 20 / 90


def test_als_flat_bundle_equals_brute_force_equals_evaluation(tmp_path):
    train(load_config(None, TINY + ["model=als", "als.alpha=4"]), tmp_path / "als")
    run = load_run(tmp_path / "als")
    retriever = Retriever.load(export(run, tmp_path / "index"))
    rows, data = run.data.train, run.data
    items, scores = retriever.recommend_indexes(rows, k=20)
    bf_items, bf_scores = retriever.recommend_indexes(rows, k=20, brute_force=True)
    np.testing.assert_allclose(scores, bf_scores, rtol=1e-4, atol=1e-5)
    assert (items == bf_items).mean() > 0.99                      # exact ties may swap
    # the evaluator's chunked ranking of the same scores is the same list
    ev_items, ev_scores = topk_excluding(run.model.score(rows.to_torch()), rows, 20, chunk=16)
    np.testing.assert_allclose(ev_scores.numpy(), bf_scores, rtol=1e-4, atol=1e-5)
    # and the ALS query tower solves the user least squares (implicit's recalculate_user):
    # (Y^T C_u Y + reg I) x_u = Y^T C_u p_u (Hu et al. 2008), with implicit's confidence
    # c_ui = alpha X_ui on the history, 1 elsewhere
    model, y = run.model, run.model.item_factors.double()
    x = model.query(rows.take_rows(np.arange(3)).to_torch())["items"].double()
    for u in range(3):
        c = torch.ones(data.n_items, dtype=torch.float64)
        c[torch.from_numpy(rows.row(u))] = model.alpha
        p = torch.zeros(data.n_items, dtype=torch.float64)
        p[torch.from_numpy(rows.row(u))] = 1.0
        a = y.T @ (c[:, None] * y) + model.regularization * torch.eye(model.factors,
                                                                      dtype=torch.float64)
        torch.testing.assert_close(x[u], torch.linalg.solve(a, y.T @ (c * p)),
                                   rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["itemknn", "ease"])
def test_export_refuses_models_without_linear_heads(tmp_path, capsys, name):
    train(load_config(None, TINY + [f"model={name}"]), tmp_path / name)
    out = tmp_path / "index"
    rc = main(["export", "--run", str(tmp_path / name), "--out", str(out)])
    err = _error_lines(capsys)
    assert rc == 2 and len(err) == 1 and "not MIPS-servable" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".index.*"))


def test_bad_baseline_config_is_one_line(tmp_path, capsys):
    # (the schema refuses to load such a config at all: the bad key comes as an override)
    rc = main(["train", "--config", _write_config(tmp_path, TINY + ["model=itemknn"]),
               "--set", "itemknn.k=0", "--out", str(tmp_path / "run")])
    err = _error_lines(capsys)
    assert rc == 2 and err == ["error: --set itemknn.k=0: config key 'itemknn.k' must be a "
                                 "positive integer, got 0"]
    assert not (tmp_path / "run").exists()
