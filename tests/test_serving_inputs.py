"""Serving validates its inputs as training does: ids of any supported type, histories
checked row by row (file, field, row), empty input -> empty output, every search setting
range-checked; each bad input is one line 'error: ...', exit status 2, nothing written."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.errors import ConfigError, DataError
from scale_diffrec.retrieval import Retriever, export, resolve
from scale_diffrec.runs import load_run
from scale_diffrec.train import train

TINY = ["batch_size=40", "epochs=1", "topk=[10, 20]", "model=diffrec", "denoiser.dims=[8]",
        "diffusion.steps=3", "data.split.valid=0.2", "data.split.test=0.2"]


def write_interactions(path, users, items):
    pq.write_table(pa.table({"user_id": users, "item_id": items}), path)
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """{'str': bundle of string item ids, 'int': bundle of integer ids}."""
    root = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), 8)
    items = rng.integers(0, 30, len(users))
    out = {}
    for kind, item_ids in (("str", [f"sku-{i}" for i in items]), ("int", items * 10 + 7)):
        data = write_interactions(root / f"{kind}.parquet",
                                  [f"u{u}" for u in users] if kind == "str" else users,
                                  item_ids)
        train(load_config(None, TINY + ["data.source=parquet", f"data.path={data}"]),
              root / f"run-{kind}")
        out[kind] = export(load_run(root / f"run-{kind}"), root / f"bundle-{kind}",
                           kind="hnsw" if kind == "int" else "ivf")
    return out


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(err, *parts):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)


def test_string_ids_survive_the_bundle_and_come_back(bundles, capsys):
    retriever = Retriever.load(bundles["str"])
    assert retriever.id_kind == "str"
    ids, scores = retriever.recommend([["sku-1", "sku-2"], []], k=5)
    assert all(isinstance(i, str) and i.startswith("sku-") for i in ids.ravel())
    assert not {"sku-1", "sku-2"} & set(ids[0])
    assert np.isfinite(scores).all()
    code, out, _ = run_cli(capsys, "recommend", "--index", bundles["str"], "--items",
                           "sku-1,sku-2", "-k", "5", "--brute-force")
    assert code == 0 and json.loads(out)["items"] == ids[0].tolist()
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["str"], "--items",
                           "sku-1,nope", "-k", "5")
    assert code == 2
    assert_one_line(err, "--items", "row 1", "unknown item id 'nope'")
    with pytest.raises(DataError, match="item id 3 is a int; the bundle's item ids are strings"):
        retriever.recommend([[3]], k=5)
    manifest = (resolve(bundles["str"]) / "item_ids.parquet").read_bytes()
    assert b"pickle" not in manifest            # stored as a string column


def test_integer_bundle_rejects_non_integer_ids_in_one_line(bundles, capsys):
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "7,x7")
    assert code == 2
    assert_one_line(err, "--items", "row 1", "'x7' is not an integer")
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "7,8")
    assert_one_line(err, "--items", "row 1", "unknown item id 8 ")
    with pytest.raises(DataError, match="item id 'a' is a str"):
        Retriever.load(bundles["int"]).recommend([[7, "a"]], k=3)


def test_a_search_setting_the_index_does_not_take_is_refused(bundles, capsys):
    for kind, option, index in [("int", "--nprobe", "hnsw"), ("str", "--ef-search", "ivf")]:
        code, out, err = run_cli(capsys, "recommend", "--index", bundles[kind], "--items",
                                 "17" if kind == "int" else "sku-1", option, "4")
        assert code == 2 and out == ""
        assert_one_line(err, option, f"does not apply to the bundle's {index} index")


def test_fewer_than_k_from_an_approximate_index_is_a_warning(bundles, tmp_path, capsys,
                                                             monkeypatch):
    from scale_diffrec.retrieval import index
    search = index.SearchUnit.search

    def approximate(unit, queries, k):     # an HNSW graph that reaches only 10 items
        items, scores = search(unit, queries, k)
        items[:, 10:], scores[:, 10:] = -1, -np.inf
        return items, scores
    code, out, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "17",
                             "-k", "29", "--ef-search", "1")
    assert code == 0 and len(json.loads(out)["items"]) == 29 and err == ""
    monkeypatch.setattr(index.SearchUnit, "search", approximate)
    code, out, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "17",
                             "-k", "29", "--ef-search", "1")
    assert code == 0 and 0 < len(json.loads(out)["items"]) < 29      # the rows are kept
    assert err.startswith("warning: 1 of 1 rows got fewer than 29 items") and \
        err.count("\n") == 1 and "--ef-search" in err
    histories, recs = tmp_path / "h.parquet", tmp_path / "recs.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [17, 27]}), histories)
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--histories",
                           histories, "--out", recs, "-k", "29", "--ef-search", "1")
    assert code == 0 and err.startswith("warning: 2 of 2 rows") and err.count("\n") == 1
    monkeypatch.undo()
    # a catalogue smaller than k is not a warning: every unseen item comes back
    code, out, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "17",
                             "-k", "50")
    assert code == 0 and len(json.loads(out)["items"]) == 29 and err == ""


def test_items_are_parsed_as_written(bundles, capsys):
    for kind, items, where, what in [("int", "17,,27", "row 1", "an empty item id"),
                                     ("str", "sku-1,", "row 1", "an empty item id"),
                                     ("str", "", "row 0", "no item ids"),
                                     ("int", " ", "row 0", "no item ids")]:
        code, out, err = run_cli(capsys, "recommend", "--index", bundles[kind], "--items",
                                 items, "-k", "5")
        assert code == 2 and out == ""
        assert_one_line(err, "--items", where, what)
    # a space is part of a string id (' sku-1' is not sku-1); around an integer it is not
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["str"], "--items",
                           "sku-2, sku-1", "-k", "5")
    assert code == 2
    assert_one_line(err, "--items", "row 1", "unknown item id ' sku-1'")
    code, out, _ = run_cli(capsys, "recommend", "--index", bundles["int"], "--items",
                           "17, 27", "-k", "5")
    assert code == 0 and not {17, 27} & set(json.loads(out)["items"])


@pytest.mark.parametrize("kind", ["int", "str"])
def test_histories_are_validated_like_training_parquet(bundles, tmp_path, capsys, kind):
    known = "sku-1" if kind == "str" else 17
    unknown = "sku-999" if kind == "str" else 999
    other_kind = 17 if kind == "str" else "sku-1"
    out = tmp_path / "recs.parquet"
    cases = {
        "null item": ({"user_id": [1, 1, 2], "item_id": pa.array([known, known, None])},
                      ["field 'item_id', row 2", "missing (null) id"]),
        "null user": ({"user_id": pa.array([1, None]), "item_id": [known, known]},
                      ["field 'user_id', row 1", "missing (null) id"]),
        "unknown item": ({"user_id": [3, 1, 1], "item_id": [known, known, unknown]},
                         ["field 'item_id', row 2", f"unknown item id {unknown!r}"]),
        "wrong columns": ({"user": [1], "item": [known]},
                          ["field 'user_id'", "missing column"]),
        "wrong id kind": ({"user_id": [1], "item_id": [other_kind]},
                          ["field 'item_id', row 0", "the bundle's item ids are"]),
        "negative id": ({"user_id": [-1], "item_id": [known]},
                        ["field 'user_id', row 0", "negative id -1"]),
    }
    for what, (columns, parts) in cases.items():
        path = tmp_path / f"{what}.parquet"
        pq.write_table(pa.table(columns), path)
        code, _, err = run_cli(capsys, "recommend", "--index", bundles[kind], "--histories",
                               path, "--out", out)
        assert code == 2, what
        assert_one_line(err, str(path), *parts)
        assert not out.exists(), what
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    code, _, err = run_cli(capsys, "recommend", "--index", bundles[kind], "--histories",
                           tmp_path / "garbage.parquet", "--out", out)
    assert code == 2 and "not a readable parquet file" in err and err.count("\n") == 1


def test_empty_histories_give_empty_recommendations(bundles, tmp_path, capsys):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"user_id": pa.array([], pa.int64()),
                             "item_id": pa.array([], pa.int64())}), path)
    out = tmp_path / "recs.parquet"
    code, stdout, _ = run_cli(capsys, "recommend", "--index", bundles["int"], "--histories",
                              path, "--out", out)
    assert code == 0 and json.loads(stdout)["users"] == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.column_names == ["user", "rank", "item", "score"]


def test_batch_histories_equal_one_at_a_time(bundles, tmp_path, capsys):
    """Users come back by id, items in file order (oldest first), ranks from 1."""
    path = write_interactions(tmp_path / "h.parquet", ["b", "a", "b", "a"],
                              ["sku-1", "sku-2", "sku-3", "sku-4"])
    out = tmp_path / "recs.parquet"
    code, _, _ = run_cli(capsys, "recommend", "--index", bundles["str"], "--histories", path,
                         "--out", out, "-k", "4", "--batch-size", "1")
    assert code == 0
    got = pq.read_table(out).to_pydict()
    retriever = Retriever.load(bundles["str"])
    ids, _ = retriever.recommend([["sku-2", "sku-4"], ["sku-1", "sku-3"]], k=4)
    assert got["user"] == ["a"] * 4 + ["b"] * 4 and got["rank"] == [1, 2, 3, 4] * 2
    assert got["item"] == ids.ravel().tolist()


@pytest.mark.parametrize("argv, option", [
    (["--nprobe", "0"], "--nprobe"), (["-k", "-3"], "-k"), (["-k", "0"], "-k"),
    (["--ef-search", "0", "-k", "20"], "--ef-search"), (["--batch-size", "0"], "--batch-size"),
])
def test_search_settings_are_range_checked(bundles, tmp_path, capsys, argv, option):
    histories = write_interactions(tmp_path / "h.parquet", [1], [17])
    out = tmp_path / "recs.parquet"
    for bundle in bundles.values():
        for source in (["--items", "17"], ["--histories", histories, "--out", out]):
            code, _, err = run_cli(capsys, "recommend", "--index", bundle, *source, *argv)
            assert code == 2
            assert_one_line(err, f"{option} must be an integer >= 1")
            assert not out.exists()


def test_search_settings_are_checked_from_python_too(bundles):
    retriever = Retriever.load(bundles["int"])
    with pytest.raises(ConfigError, match="--ef-search must be an integer >= 1, got 0"):
        retriever.set_search(ef_search=0)
    with pytest.raises(ConfigError, match="-k must be an integer >= 1, got -3"):
        retriever.recommend([[17]], k=-3)
    retriever.set_search(ef_search=1)            # the smallest legal value still gives k
    ids, _ = retriever.recommend([[17]], k=20)
    assert (ids >= 0).sum() == 20


@pytest.mark.parametrize("argv, message", [
    (["--index", "ivf", "--nlist", "0"], "--nlist must be an integer >= 1"),
    (["--index", "ivf", "--nprobe", "-1"], "--nprobe must be an integer >= 1"),
    (["--index", "hnsw", "--M", "1"], "--M must be an integer >= 2"),
    (["--index", "ivfpq", "--pq-m", "0"], "--pq-m must be an integer >= 1"),
    (["--shards", "0"], "--shards must be an integer >= 1"),
    (["--index", "flat", "--nprobe", "4"], "index 'flat' has no parameter(s) --nprobe"),
    # 30 items: one list of >= 39 items at most; explicit values are not capped quietly
    (["--index", "ivf", "--nlist", "100000"], "--nlist 100000: at most 1 for a unit of 30"),
    (["--index", "ivf", "--nprobe", "500"], "--nprobe 500: at most 1, the lists of a unit"),
    (["--shards", "31"], "--shards 31: at most 30, the items of the smallest head"),
])
def test_export_settings_are_range_checked_before_writing(bundles, tmp_path, capsys, argv,
                                                          message):
    run = bundles["int"].parent / "run-int"
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "export", "--run", run, "--out", out, *argv)
    assert code == 2
    assert_one_line(err, message)
    assert not out.exists()


def test_export_refuses_a_folder_that_is_not_a_bundle(bundles, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "export", "--run", bundles["int"].parent / "run-int",
                           "--out", out)
    assert code == 2
    assert_one_line(err, str(out), "is not an index bundle")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_histories_follow_their_timestamps_as_in_training(tmp_path, capsys):
    """T-DiffRec weights grow with recency: a timestamp column orders each user's rows."""
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 6)
    data = write_interactions(tmp_path / "d.parquet", users, rng.integers(0, 25, len(users)))
    train(load_config(None, TINY + ["data.source=parquet", f"data.path={data}",
                                    "data.time_weights={w_min: 0.1, w_max: 1.0}"]),
          tmp_path / "run")
    index = export(load_run(tmp_path / "run"), tmp_path / "bundle")
    pq.write_table(pa.table({"user_id": [1, 1, 1], "item_id": [3, 5, 8],
                             "timestamp": [30, 10, 20]}), tmp_path / "h.parquet")
    out = tmp_path / "recs.parquet"
    assert main(["recommend", "--index", str(index), "--histories", str(tmp_path / "h.parquet"),
                 "--out", str(out), "-k", "5", "--brute-force"]) == 0
    got = pq.read_table(out).to_pydict()
    retriever = Retriever.load(index)
    ids, scores = retriever.recommend([[5, 8, 3]], k=5, brute_force=True)
    _, file_order = retriever.recommend([[3, 5, 8]], k=5, brute_force=True)
    assert got["item"] == ids[0].tolist()
    np.testing.assert_allclose(got["score"], scores[0], rtol=1e-6)
    assert not np.allclose(got["score"], file_order[0], rtol=1e-6)


def test_out_that_is_a_folder_and_numpy_k(bundles, tmp_path, capsys):
    histories = write_interactions(tmp_path / "h.parquet", [1], [17])
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--histories",
                           histories, "--out", tmp_path)
    assert code == 2
    assert_one_line(err, "is a folder")
    ids, _ = Retriever.load(bundles["int"]).recommend([[17]], k=np.int64(3))
    assert ids.shape == (1, 3)


def test_paths_in_the_way_are_one_line(bundles, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    run = bundles["int"].parent / "run-int"
    cases = [(["recommend", "--index", a_file, "--items", "17"], "not an index bundle"),
             (["export", "--run", run, "--out", a_file / "b"], "is a file, not a folder"),
             (["export", "--run", run, "--out", a_file], "is not an index bundle"),
             (["recommend", "--index", bundles["int"], "--histories",
               write_interactions(tmp_path / "h.parquet", [1], [17]), "--out",
               a_file / "recs.parquet"], "recs.parquet: cannot be created: ")]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert_one_line(err, message)
    assert a_file.read_text() == ""


def test_an_out_that_cannot_be_written_is_refused_before_the_index_is_read(tmp_path, capsys):
    histories = write_interactions(tmp_path / "h.parquet", [1], [17])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    outs = ["/proc/recs.parquet"] + ([] if os.geteuid() == 0 else [locked / "recs.parquet"])
    for out in outs:            # no index at all: the --out check must come first
        code, _, err = run_cli(capsys, "recommend", "--index", tmp_path / "none", "--histories",
                               histories, "--out", out)
        assert code == 2
        assert_one_line(err, f"--out {out}: cannot write in ")
    assert list(locked.iterdir()) == []


def test_out_with_items_is_refused_not_ignored(bundles, tmp_path, capsys):
    code, out, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--items", "17",
                             "--out", tmp_path / "recs.parquet")
    assert code == 2 and out == ""
    assert_one_line(err, "with --items they are printed")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_the_histories_file_is_refused_before_writing(bundles, tmp_path, capsys):
    histories = write_interactions(tmp_path / "h.parquet", [1], [17])
    before = histories.read_bytes()
    code, _, err = run_cli(capsys, "recommend", "--index", bundles["int"], "--histories",
                           histories, "--out", tmp_path / "." / "h.parquet")
    assert code == 2
    assert_one_line(err, "is the --histories file")
    assert histories.read_bytes() == before
