"""Exported FAISS bundles: exact top-K equal to ranking the full decoder output, for every
model and both L-DiffRec decoder forms; metrics through the index equal `evaluate`; bad
bundles refused; the CLI end to end."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.errors import DataError
from scale_diffrec.evaluate import evaluate, evaluate_topk
from scale_diffrec.retrieval import Retriever, export, resolve
from scale_diffrec.retrieval.bundle import read_manifest, write_manifest
from scale_diffrec.runs import load_run
from scale_diffrec.train import train

TINY = ["data.source=synthetic", "data.synthetic.n_users=150", "data.synthetic.n_items=90",
        "data.synthetic.n_clusters=3", "data.synthetic.mean_items_per_user=10",
        "batch_size=50", "epochs=1", "eval_every=1", "topk=[10, 20]", "denoiser.dims=[16]",
        "diffusion.steps=5", "multvae.dims=[8, 16]", "ldiffrec.n_clusters=3",
        "ldiffrec.in_dims=[12]", "ldiffrec.mlp_dims=[8]", "ldiffrec.embeddings=svd",
        "ldiffrec.emb_dim=4"]
MODELS = {
    "diffrec": ["model=diffrec"],
    "multvae": ["model=multvae"],
    "ldiffrec-global-decoder": ["model=ldiffrec"],
    "ldiffrec-cluster-decoders": ["model=ldiffrec", "ldiffrec.out_dims=[6]"],
    "t-diffrec": ["model=diffrec", "data.time_weights={w_min: 0.1, w_max: 1.0}"],
    "lt-diffrec": ["model=ldiffrec", "data.time_weights={w_min: 0.1, w_max: 1.0}"],
}


def trained(tmp_path, name, extra=()):
    cfg = load_config(None, TINY + MODELS[name] + list(extra))
    train(cfg, tmp_path / name)
    return load_run(tmp_path / name)


def brute_topk(model, rows, exclude, k):
    scores = model.score(rows.to_torch())
    r = np.repeat(np.arange(exclude.n_rows), exclude.row_lengths())
    scores[torch.from_numpy(r), torch.from_numpy(exclude.indices)] = -torch.inf
    top, items = torch.topk(scores, k, dim=1)
    return items.numpy(), top.numpy()


def assert_same_ranking(items, scores, ref_items, ref_scores):
    """Equal scores (1e-5) and equal items, except that exact ties may swap places."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    differ = items != ref_items
    tied = np.isclose(scores, np.roll(scores, 1, axis=1), atol=1e-6) | \
        np.isclose(scores, np.roll(scores, -1, axis=1), atol=1e-6)
    assert not (differ & ~tied).any()


@pytest.mark.parametrize("name", list(MODELS))
def test_flat_index_equals_full_ranking_with_seen_items_excluded(tmp_path, name):
    run = trained(tmp_path, name)
    retriever = Retriever.load(export(run, tmp_path / "index"))
    rows = run.data.train
    items, scores = retriever.recommend_indexes(rows, k=20)
    ref_items, ref_scores = brute_topk(run.model, rows, rows, 20)
    assert_same_ranking(items, scores, ref_items, ref_scores)
    seen = np.repeat(np.arange(rows.n_rows), rows.row_lengths()) * rows.n_cols + rows.indices
    got = np.arange(rows.n_rows)[:, None] * rows.n_cols + items
    assert not np.isin(got, seen).any()
    bf_items, bf_scores = retriever.recommend_indexes(rows, k=20, brute_force=True)
    assert_same_ranking(bf_items, bf_scores, ref_items, ref_scores)


def test_seen_items_that_fill_the_top_k_are_excluded_exactly(tmp_path):
    run = trained(tmp_path, "ldiffrec-cluster-decoders")
    retriever = Retriever.load(export(run, tmp_path / "index", shards=2))
    free, _ = retriever.recommend([[0]], k=40, exclude_seen=False)
    history = free[0][:30].tolist()               # the model's own favourites, all seen
    items, scores = retriever.recommend([history], k=20)
    ref_items, ref_scores = retriever.recommend([history], k=20, brute_force=True)
    assert not set(items[0]) & set(history)
    assert_same_ranking(items, scores, ref_items, ref_scores)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_metrics_through_the_index_equal_evaluate(tmp_path, split):
    run = trained(tmp_path, "ldiffrec-global-decoder")
    retriever = Retriever.load(export(run, tmp_path / "index", kind="flat", shards=3))
    data, cfg = run.data, run.cfg
    exclude = data.train if split == "valid" else _union(data.train, data.valid)
    items, _ = retriever.recommend_indexes(data.train, k=20, exclude=exclude)
    via_index = evaluate_topk(items, data, split, ks=cfg["topk"], convention=cfg["convention"])
    direct = evaluate(run.model, data, split, ks=cfg["topk"], convention=cfg["convention"])
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert via_index[key] == pytest.approx(direct[key], abs=1e-9), key


def _union(a, b):
    from scale_diffrec.data.csr import CSR
    rows = np.concatenate([np.repeat(np.arange(m.n_rows), m.row_lengths()) for m in (a, b)])
    cols = np.concatenate([a.indices, b.indices])
    return CSR.from_pairs(rows, cols, a.n_rows, a.n_cols)


def test_approximate_indexes_build_and_mostly_agree(tmp_path):
    run = trained(tmp_path, "diffrec")
    exact, _ = Retriever.load(export(run, tmp_path / "flat")).recommend_indexes(run.data.train, 10)
    for kind in ("ivf", "hnsw"):
        approx, _ = Retriever.load(export(run, tmp_path / kind, kind=kind)).recommend_indexes(
            run.data.train, 10)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
        assert overlap > 0.8, (kind, overlap)


def test_ivf_probing_every_list_is_exact_through_the_l2_transform(tmp_path):
    """IVF searches [v, sqrt(M^2 - |v|^2)] by L2; probing all lists must give the flat
    index's items and inner-product scores back."""
    run = trained(tmp_path, "ldiffrec-global-decoder")
    rows = run.data.train
    ref_items, ref_scores = brute_topk(run.model, rows, rows, 20)
    retriever = Retriever.load(export(run, tmp_path / "ivf", kind="ivf",
                                      params={"nlist": 2, "nprobe": 2}))
    items, scores = retriever.recommend_indexes(rows, k=20)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert (items == ref_items).mean() > 0.99


def test_original_ids_of_parquet_data_come_back(tmp_path):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(60), 8)
    items = rng.integers(0, 40, len(users)) * 10 + 7            # ids 7, 17, ..., 397
    path = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": users * 3 + 1, "item_id": items}), path)
    cfg = load_config(None, TINY + ["model=diffrec", "data.source=parquet",
                                    f"data.path={path}"])
    train(cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    retriever = Retriever.load(export(run, tmp_path / "index"))
    got, _ = retriever.recommend([[7, 17, 27]], k=5)
    assert set(got[0]) <= set(items.tolist()) and not {7, 17, 27} & set(got[0])
    with pytest.raises(DataError, match="unknown item id 8 "):
        retriever.recommend([[8]], k=5)


def test_corrupted_or_mismatched_bundles_are_refused(tmp_path):
    run = trained(tmp_path, "diffrec")
    folder = resolve(export(run, tmp_path / "index"))
    tower = folder / "query_tower.pt"
    good = tower.read_bytes()
    tower.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(DataError, match="query_tower.pt: checksum mismatch"):
        Retriever.load(folder.parent)
    tower.write_bytes(good)
    manifest = read_manifest(folder)
    # a field changed by hand breaks the seal; sealed again, the field checks still refuse it
    text = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").write_bytes(text.replace(b'"n_items": ', b'"n_items": 1', 1))
    with pytest.raises(DataError, match="manifest.json: checksum mismatch"):
        Retriever.load(folder.parent)
    write_manifest(folder, {**manifest, "version": 99})
    with pytest.raises(DataError, match="manifest.json.*version"):
        Retriever.load(folder.parent)
    write_manifest(folder, {**manifest, "n_items": manifest["n_items"] + 1})
    with pytest.raises(DataError, match="item ids but the manifest says"):
        Retriever.load(folder.parent)
    manifest["heads"][0]["units"][0]["dim"] += 1
    write_manifest(folder, manifest)
    with pytest.raises(DataError, match="dimension"):
        Retriever.load(folder.parent)


def test_failed_export_keeps_the_earlier_bundle(tmp_path, monkeypatch):
    run = trained(tmp_path, "diffrec")
    folder = export(run, tmp_path / "index")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    import scale_diffrec.retrieval.bundle as bundle

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(bundle, "build_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(run, folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_cli_export_and_recommend(tmp_path, capsys):
    run = trained(tmp_path, "ldiffrec-global-decoder")
    index = tmp_path / "bundle"
    assert main(["export", "--run", str(run.run_dir), "--out", str(index),
                 "--index", "ivf", "--nprobe", "2"]) == 0   # 90 items: 2 lists
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["index"] == "ivf"
    assert main(["recommend", "--index", str(index), "--items", "1,2,3", "-k", "5",
                 "--brute-force"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(one["items"]) == 5 and not {1, 2, 3} & set(one["items"])
    histories = tmp_path / "histories.parquet"
    pq.write_table(pa.table({"user_id": [5, 5, 5, 9], "item_id": [1, 2, 3, 4]}), histories)
    recs = tmp_path / "recs.parquet"
    assert main(["recommend", "--index", str(index), "--histories", str(histories),
                 "--out", str(recs), "-k", "5", "--brute-force"]) == 0
    table = pq.read_table(recs).to_pydict()
    assert table["user"] == [5] * 5 + [9] * 5 and table["rank"] == [1, 2, 3, 4, 5] * 2
    assert table["item"][:5] == one["items"]
    capsys.readouterr()
    (resolve(index) / "manifest.json").write_text("{}")
    assert main(["recommend", "--index", str(index), "--items", "1", "-k", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "manifest.json" in err and "Traceback" not in err


def test_every_option_an_index_message_names_exists_and_reaches_faiss(tmp_path, capsys):
    import re
    from scale_diffrec.cli import build_parser
    from scale_diffrec.errors import ConfigError
    from scale_diffrec.retrieval.params import DEFAULTS, SEARCH_PARAMS, check_params, option
    parser = build_parser()
    export_args = ["export", "--run", "r", "--out", "o"]
    for kind, params in DEFAULTS.items():     # every setting of every kind is an option
        for key in params:
            assert getattr(parser.parse_args([*export_args, option(key), "3"]), key) == 3
    for key in {k for keys in SEARCH_PARAMS.values() for k in keys}:
        assert getattr(parser.parse_args(["recommend", "--index", "b", option(key), "3"]),
                       key) == 3
    for kind in DEFAULTS:                     # what a wrong setting's message names, too
        foreign = next(k for params in DEFAULTS.values() for k in params
                       if k not in DEFAULTS[kind])
        with pytest.raises(ConfigError) as err:
            check_params(kind, {foreign: 3})
        named = re.findall(r"(--[\w-]+)", str(err.value))
        assert option(foreign) in named and len(named) == 1 + len(DEFAULTS[kind])
        for flag in named:
            parser.parse_args([*export_args, "--index", kind, flag, "3"])
    run = trained(tmp_path, "multvae")
    assert main(["export", "--run", str(run.run_dir), "--out", str(tmp_path / "b"), "--index",
                 "hnsw", "--M", "8", "--ef-construction", "16"]) == 0
    units = [u for h in read_manifest(resolve(tmp_path / "b"))["heads"] for u in h["units"]]
    assert [(u["params"]["M"], u["params"]["ef_construction"]) for u in units] == [(8, 16)]
