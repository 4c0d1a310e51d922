"""Bad input: every DataError names the file and the field and/or row; bad config keys
raise ConfigError naming the dotted key; writers leave existing files intact on failure."""
import copy
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.data import (load_data, load_diffrec_npy, load_id_maps, load_parquet,
                                save_id_maps)
from scale_diffrec.data import synthetic as synthetic_module
from scale_diffrec.data.synthetic import write_synthetic_parquet
from scale_diffrec.errors import ConfigError, DataError
from scale_diffrec.schema import DEFAULTS

GOOD = {"train": [[0, 0], [0, 1], [1, 2], [1, 0], [2, 1], [2, 2]],
        "valid": [[0, 2], [1, 1]],
        "test": [[2, 0], [1, 3]]}


def npy_folder(tmp_path, **override):
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    for split in ("train", "valid", "test"):
        arr = override.get(split, np.asarray(GOOD[split], dtype=np.int64))
        if arr is not None:
            np.save(folder / f"{split}_list.npy", arr)
    return folder


def expect(exc_type, pattern, fn, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert re.search(pattern, str(info.value)), str(info.value)
    return info.value


# ------------------------------------------------------------------------------ npy

def test_npy_good_folder_loads(tmp_path):
    d = load_diffrec_npy(npy_folder(tmp_path))
    assert (d.n_users, d.n_items) == (3, 4)


def test_npy_missing_folder_and_file(tmp_path):
    expect(DataError, r"nowhere: dataset folder not found", load_diffrec_npy, tmp_path / "nowhere")
    expect(DataError, r"ds/test_list\.npy: file not found", load_diffrec_npy,
           npy_folder(tmp_path, test=None))


@pytest.mark.parametrize("split, arr, pattern", [
    ("train", [[0, 0], [0, 1], [1, -1]], r"train_list\.npy, field 'item', row 2: negative id -1"),
    ("valid", [[0, 2], [-4, 1]], r"valid_list\.npy, field 'user', row 1: negative id -4"),
    ("train", np.array([[0, 0], [1.5, 1]]), r"train_list\.npy, field 'user', row 1: "
                                            r"non-integer id 1\.5"),
    ("test", np.array([[2, 0], [1, np.nan]]), r"test_list\.npy, field 'item', row 1: "
                                              r"missing id \(nan\)"),
    ("test", np.zeros((0, 2), np.int64), r"test_list\.npy: no interactions"),
    ("valid", np.zeros((4, 3), np.int64), r"valid_list\.npy: expected an array of shape "
                                          r"\[n, 2\].*got shape \[4, 3\]"),
    ("valid", np.zeros(8, np.int64), r"valid_list\.npy: expected an array of shape \[n, 2\]"),
    ("train", np.array([["0", "1"]]), r"train_list\.npy: expected integer ids, got dtype <U1"),
    ("train", np.array([[True, False]]), r"train_list\.npy: expected integer ids, got dtype bool"),
    ("test", [[2, 0], [3, 1]], r"test_list\.npy, field 'user', row 1: user 3 has test "
                               r"interactions but none in train_list\.npy"),
])
def test_npy_bad_arrays(tmp_path, split, arr, pattern):
    folder = npy_folder(tmp_path, **{split: np.asarray(arr)})
    expect(DataError, pattern, load_diffrec_npy, folder)


def test_npy_float_whole_numbers_accepted(tmp_path):
    folder = npy_folder(tmp_path, valid=np.array([[0.0, 2.0], [1.0, 1.0]]))
    assert load_diffrec_npy(folder).valid.nnz == 2


def test_npy_ids_past_declared_n_items(tmp_path):
    folder = npy_folder(tmp_path)
    expect(DataError, r"test_list\.npy, field 'item', row 1: item id 3 is not below the "
                      r"declared data.n_items = 3", load_diffrec_npy, folder, n_items=3)


def test_npy_truncated_corrupt_object(tmp_path):
    folder = npy_folder(tmp_path)
    raw = (folder / "train_list.npy").read_bytes()
    (folder / "train_list.npy").write_bytes(raw[: len(raw) - 20])
    expect(DataError, r"train_list\.npy: not a readable \.npy array", load_diffrec_npy, folder)
    (folder / "train_list.npy").write_text("user,item\n0,1\n")
    expect(DataError, r"train_list\.npy: not a readable \.npy array", load_diffrec_npy, folder)
    np.save(folder / "train_list.npy", np.array([[0, "a"]], dtype=object))
    expect(DataError, r"train_list\.npy: not a readable \.npy array", load_diffrec_npy, folder)


def test_npy_bad_item_emb(tmp_path):
    folder = npy_folder(tmp_path)
    np.save(folder / "item_emb.npy", np.zeros((3, 8), np.float32))
    expect(DataError, r"item_emb\.npy: 3 rows but the data has 4 items", load_diffrec_npy, folder)
    emb = np.zeros((4, 8), np.float32)
    emb[2, 5] = np.nan
    np.save(folder / "item_emb.npy", emb)
    expect(DataError, r"item_emb\.npy, row 2: embedding is not finite", load_diffrec_npy, folder)
    np.save(folder / "item_emb.npy", np.zeros(4, np.float32))
    expect(DataError, r"item_emb\.npy: expected an array of shape \[n_items, d\]",
           load_diffrec_npy, folder)


# -------------------------------------------------------------------------- parquet

def parquet(tmp_path, name="x.parquet", row_group_size=None, **columns):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def many_rows(n=40):
    users = np.repeat(np.arange(n // 4), 4)
    items = np.tile(np.arange(4), n // 4)
    return users, items


def test_parquet_missing_file_folder_and_columns(tmp_path):
    expect(DataError, r"absent\.parquet: file not found", load_parquet, tmp_path / "absent.parquet")
    expect(DataError, r"expected a parquet file, found a folder", load_parquet, tmp_path)
    path = parquet(tmp_path, user_id=[1, 2], item=[1, 2])
    expect(DataError, r"x\.parquet, field 'item_id': missing column", load_parquet, path)


@pytest.mark.parametrize("batch_rows", [5, 1 << 20])
def test_parquet_negative_id_names_global_row(tmp_path, batch_rows):
    users, items = many_rows()
    items = items.copy()
    items[17] = -3
    path = parquet(tmp_path, row_group_size=6, user_id=users, item_id=items)
    expect(DataError, r"x\.parquet, field 'item_id', row 17: negative id -3",
           load_parquet, path, batch_rows=batch_rows)


@pytest.mark.parametrize("column, values, pattern", [
    ("user_id", pa.array([0, 0, 1.5, 1] * 10, pa.float64()),
     r"field 'user_id', row 2: non-integer id 1\.5"),
    ("user_id", pa.array([0.0, 0.0, 1.0, float("nan")] * 10),
     r"field 'user_id', row 3: missing id \(nan\)"),
    ("item_id", pa.array([0, 1, None, 3] * 10, pa.int64()),
     r"field 'item_id', row 2: missing \(null\) id"),
    ("item_id", pa.array(["a", "b", "c", None] * 10),
     r"field 'item_id', row 3: missing \(null\) id"),
    ("user_id", pa.array([-2.0, 0.0, 1.0, 1.0] * 10),
     r"field 'user_id', row 0: negative id -2"),
    ("item_id", pa.array([True, False] * 20), r"field 'item_id': ids must be integers or strings"),
    ("item_id", pa.array([b"a", b"b"] * 20), r"field 'item_id': ids must be integers or strings"),
])
def test_parquet_bad_ids(tmp_path, column, values, pattern):
    users, items = many_rows()
    cols = {"user_id": pa.array(users), "item_id": pa.array(items)}
    cols[column] = values
    path = parquet(tmp_path, **cols)
    expect(DataError, r"x\.parquet, " + pattern, load_parquet, path)


@pytest.mark.parametrize("values, pattern", [
    (pa.array([1, 2, None, 4] * 10, pa.int64()), r"field 'timestamp', row 2: missing \(null\)"),
    (pa.array([1.0, 2.0, 3.0, float("nan")] * 10), r"field 'timestamp', row 3: timestamp is "
                                                   r"not finite"),
    (pa.array(["2020"] * 40), r"field 'timestamp': timestamps must be integers"),
])
def test_parquet_bad_timestamps(tmp_path, values, pattern):
    users, items = many_rows()
    path = parquet(tmp_path, user_id=users, item_id=items, timestamp=values)
    expect(DataError, r"x\.parquet, " + pattern, load_parquet, path)


def test_parquet_ids_past_declared_n_items(tmp_path):
    users, items = many_rows()
    path = parquet(tmp_path, row_group_size=7, user_id=users, item_id=items)
    expect(DataError, r"x\.parquet, field 'item_id', row 3: item id 3 is not below the "
                      r"declared data.n_items = 3", load_parquet, path, n_items=3, batch_rows=2)
    path = parquet(tmp_path, "s.parquet", user_id=users, item_id=items.astype(str))
    expect(DataError, r"s\.parquet, field 'item_id': data.n_items = 10 is declared, so item "
                      r"ids must be integer", load_parquet, path, n_items=10)


def test_parquet_empty_splits(tmp_path):
    # every user has a single interaction: all stay in train, valid and test are empty
    path = parquet(tmp_path, user_id=[1, 2, 3], item_id=[1, 1, 2])
    expect(DataError, r"x\.parquet: the split rule 'random' .* leaves the valid split empty",
           load_parquet, path)
    # 3 interactions per user: test gets one each, valid (0.1 * 3 -> 0) none
    path = parquet(tmp_path, "y.parquet", user_id=[1, 1, 1], item_id=[1, 2, 3])
    expect(DataError, r"y\.parquet: .* leaves the valid split empty", load_parquet, path)
    path = parquet(tmp_path, "z.parquet", user_id=[1, 1, 1], item_id=[1, 2, 3])
    expect(DataError, r"z\.parquet: .* leaves the test split empty", load_parquet, path,
           split={"valid": 0.4, "test": 0.1})
    empty = parquet(tmp_path, "e.parquet", user_id=pa.array([], pa.int64()),
                    item_id=pa.array([], pa.int64()))
    expect(DataError, r"e\.parquet: no interactions", load_parquet, empty)


def test_parquet_time_rule_needs_timestamp(tmp_path):
    users, items = many_rows()
    path = parquet(tmp_path, user_id=users, item_id=items)
    expect(DataError, r"x\.parquet, field 'timestamp': the 'time' split rule", load_parquet,
           path, split={"rule": "time"})


def test_parquet_not_parquet_truncated_corrupt(tmp_path):
    text = tmp_path / "x.parquet"
    text.write_text("user_id,item_id\n1,2\n")
    expect(DataError, r"x\.parquet: not a readable parquet file", load_parquet, text)
    users, items = many_rows(400)
    path = parquet(tmp_path, "t.parquet", row_group_size=100, user_id=users, item_id=items)
    raw = path.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(raw[: len(raw) - 30])
    expect(DataError, r"cut\.parquet: not a readable parquet file", load_parquet, cut)
    # garbage inside the second row group's data pages: unreadable from row 100
    meta = pq.ParquetFile(path).metadata.row_group(1)
    start = meta.column(0).data_page_offset
    end = meta.column(1).data_page_offset + meta.column(1).total_compressed_size
    bad = bytearray(raw)
    bad[start:end] = b"\xff" * (end - start)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(bad))
    expect(DataError, r"corrupt\.parquet, row 100: cannot read the parquet data", load_parquet,
           corrupt, batch_rows=100)


def test_loaders_write_nothing(tmp_path):
    users, items = many_rows()
    parquet(tmp_path, user_id=users, item_id=items)
    npy_folder(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    load_parquet(tmp_path / "x.parquet", split={"valid": 0.25, "test": 0.25})
    load_diffrec_npy(tmp_path / "ds")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------- config

def data_cfg(**data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"].update(data)
    return cfg


@pytest.mark.parametrize("data, pattern", [
    ({"source": "csv"}, r"'data.source' must be one of"),
    ({"source": "parquet"}, r"'data.path' is required"),
    ({"split": {"rule": "stratified", "valid": 0.1, "test": 0.2, "seed": 0}}, r"'data.split.rule'"),
    ({"split": {"rule": "random", "valid": 0.0, "test": 0.2, "seed": 0}}, r"'data.split.valid'"),
    ({"split": {"rule": "random", "valid": 0.5, "test": 0.5, "seed": 0}}, r"'data.split.valid' \+"),
    ({"split": {"rule": "random", "valid": 0.1, "test": 0.2, "seed": 0, "x": 1}},
     r"'data.split.x'"),
    ({"time_weights": {"w_min": 0.5}}, r"'data.time_weights.w_max' is missing"),
    ({"time_weights": {"w_min": 0.9, "w_max": 0.1}}, r"'data.time_weights.w_min'"),
    ({"time_weights": {"w_min": 0.1, "w_max": 1.0, "w_mid": 0.5}}, r"'data.time_weights.w_mid'"),
    ({"time_weights": 0.5}, r"'data.time_weights' must be a mapping"),
    ({"synthetic": {"n_user": 10}}, r"unknown config key 'data.synthetic.n_user'"),
    ({"synthetic": {"cluster_affinity": 1.5}}, r"'data.synthetic.cluster_affinity'"),
    ({"synthetic": {"n_items": 5, "n_clusters": 8}}, r"'data.synthetic.n_clusters'"),
    ({"n_items": 999}, r"'data.n_items' \(999\) differs from 'data.synthetic.n_items'"),
    ({"n_items": -1}, r"'data.n_items' must be a positive integer"),
])
def test_config_errors_name_the_key(data, pattern):
    expect(ConfigError, pattern, load_data, data_cfg(**data))


# --------------------------------------------------------------------------- writers

def id_map_data(tmp_path):
    path = parquet(tmp_path, "s.parquet", user_id=["a", "a", "a", "b", "b", "b"],
                   item_id=[10, 20, 30, 10, 20, 30])
    return load_parquet(path, split={"valid": 0.34, "test": 0.34})


def test_save_id_maps_failure_leaves_existing_maps(tmp_path):
    data = id_map_data(tmp_path)
    out = tmp_path / "maps"
    save_id_maps(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the item map cannot be written (mixed id types): nothing is replaced
    data.user_ids = np.array(["x", "y"], dtype=object)
    data.item_ids = np.array([1, "two", 3.5], dtype=object)
    expect(DataError, r"maps/item_ids\.parquet, field 'item_id': cannot write the id map",
           save_id_maps, data, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    data.item_ids = np.array([1, 2])
    expect(DataError, r"item_ids\.parquet, field 'item_id': the id map has shape \[2\] but the "
                      r"data has 3 items", save_id_maps, data, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_save_id_maps_failure_while_writing(tmp_path, monkeypatch):
    data = id_map_data(tmp_path)
    out = tmp_path / "maps"
    save_id_maps(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = pq.write_table
    calls = []

    def failing(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:               # the second temp file: disk full, say
            raise OSError("No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", failing)
    data.user_ids = np.array(["p", "q"], dtype=object)
    with pytest.raises(OSError, match="No space"):
        save_id_maps(data, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # no temp files left


def test_load_id_maps_errors(tmp_path):
    out = tmp_path / "maps"
    save_id_maps(id_map_data(tmp_path), out)
    (out / "item_ids.parquet").unlink()
    expect(DataError, r"maps/item_ids\.parquet: file not found", load_id_maps, out)
    pq.write_table(pa.table({"index": [0, 1], "id": [5, 6]}), out / "item_ids.parquet")
    expect(DataError, r"item_ids\.parquet, field 'item_id': missing column", load_id_maps, out)
    pq.write_table(pa.table({"index": [0, 2], "item_id": [5, 6]}), out / "item_ids.parquet")
    expect(DataError, r"item_ids\.parquet, field 'index', row 1: the indexes must be 0\.\.1",
           load_id_maps, out)
    pq.write_table(pa.table({"index": [1, 0], "item_id": [5, 5]}), out / "item_ids.parquet")
    expect(DataError, r"item_ids\.parquet, field 'item_id': original id 5 appears more than once",
           load_id_maps, out)
    pq.write_table(pa.table({"index": [1, 0], "item_id": [6, 5]}), out / "item_ids.parquet")
    assert load_id_maps(out)[1].tolist() == [5, 6]


def test_write_synthetic_parquet_failure_leaves_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "syn.parquet"
    write_synthetic_parquet(path, n_users=50, n_items=40, n_clusters=4, rows_per_group=100)
    before = path.read_bytes()
    real = synthetic_module.iter_blocks

    def broken(params, catalogue=None):
        for i, block in enumerate(real(params, catalogue)):
            if i == 1:
                raise RuntimeError("generator failed")
            yield block

    monkeypatch.setattr(synthetic_module, "USER_BLOCK", 20)
    monkeypatch.setattr(synthetic_module, "iter_blocks", broken)
    with pytest.raises(RuntimeError, match="generator failed"):
        write_synthetic_parquet(path, n_users=50, n_items=40, n_clusters=4, rows_per_group=10)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["syn.parquet"]
    expect(ConfigError, r"'synthetic.cluster_affinity'", write_synthetic_parquet, path,
           n_users=5, n_items=50, cluster_affinity=2.0)
    assert path.read_bytes() == before
