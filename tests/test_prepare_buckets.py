"""``prepare`` in bounded memory: the log is spilled into buckets of users
(data/buckets.py) and every result must be the same whatever the number of buckets."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.data.buckets import bucket_starts
from scale_diffrec.data.prepare import prepare
from scale_diffrec.data.prepare_config import load_prepare_config

FILES = ("train.parquet", "valid.parquet", "test.parquet", "user_ids.parquet",
         "item_ids.parquet")
RUN_ONLY = ("seconds", "peak_rss_mib", "buckets")        # stats that describe the run


def test_bucket_starts_cut_contiguous_user_ranges_by_rows():
    # rows before each user: 0, 3, 4, 9, 11 -> // 4: buckets 0, 0, 1, 2, 2
    assert bucket_starts(np.array([3, 1, 5, 2, 2]), 4).tolist() == [0, 2, 3]
    # a user with more rows than a bucket holds is a bucket of its own: 0, 10, 11 -> 0, 2, 2
    assert bucket_starts(np.array([10, 1, 1]), 4).tolist() == [0, 1]
    assert bucket_starts(np.array([2, 2]), 100).tolist() == [0]


def _log(path, seed=0, n=3000):
    """Users 0..79 with skewed activity, items 0..119 with skewed popularity, repeated
    pairs, ratings 1..5, timestamps from a small range (many ties), rows shuffled."""
    rng = np.random.default_rng(seed)
    users = (80 * rng.random(n) ** 2).astype(np.int64) * 7 + 3      # ids 3, 10, ...
    items = (120 * rng.random(n) ** 2).astype(np.int64)
    pq.write_table(pa.table({"user_id": users, "item_id": [f"i{i:03d}" for i in items],
                             "rating": rng.integers(1, 6, n).astype(np.int8),
                             "timestamp": rng.integers(0, 40, n)}), path)
    return path


@pytest.mark.parametrize("sets", [
    ["rating_threshold=4", "natural_noise=true"],                           # random
    ["rating_threshold=3", "dedupe=last", "kcore.users=8", "kcore.items=8",
     "split.rule=time", "natural_noise=true"],
    ["kcore.users=5", "kcore.items=4", "split.rule=leave_one_out", "split.seed=3"],
])
def test_any_number_of_buckets_gives_the_same_bytes_and_stats(tmp_path, sets):
    log = _log(tmp_path / "log.parquet")
    one = prepare(log, tmp_path / "one", load_prepare_config(None, sets))
    # ~10 rows of the log per bucket (memory_mib * 2^20 / 100 bytes per row), and
    # batches of 97 rows: many spill chunks per bucket and many buckets per chunk
    many = prepare(log, tmp_path / "many", load_prepare_config(None, sets + ["memory_mib=0.001"]),
                   batch_rows=97)
    assert one["buckets"] == 1 and many["buckets"] > 50
    assert sum(many["interactions"].values()) > 300          # something to compare
    if "kcore.users=8" in sets:                             # a 6-pass cascade
        assert len(one["steps"]["kcore_passes"]) == 6
    for file in FILES:
        assert (tmp_path / "one" / file).read_bytes() == \
            (tmp_path / "many" / file).read_bytes(), file
    strip = lambda s: {k: v for k, v in s.items() if k not in RUN_ONLY}
    assert strip(one) == strip(many)
    assert strip(json.loads((tmp_path / "many" / "stats.json").read_text())) == strip(many)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == \
        sorted(FILES + ("dataset.json", "stats.json"))          # the spill is gone


def test_random_split_does_not_depend_on_row_order_or_buckets(tmp_path):
    log = _log(tmp_path / "log.parquet")
    t = pq.read_table(log)
    pq.write_table(t.take(np.random.default_rng(5).permutation(t.num_rows)),
                   tmp_path / "shuffled.parquet")
    prepare(log, tmp_path / "a", load_prepare_config(None, ["split.seed=2"]))
    prepare(tmp_path / "shuffled.parquet", tmp_path / "b",
            load_prepare_config(None, ["split.seed=2", "memory_mib=0.002"]))
    prepare(log, tmp_path / "c", load_prepare_config(None, ["split.seed=9"]))
    pairs = lambda d, s: set(zip(*[pq.read_table(tmp_path / d / f"{s}.parquet")
                                   .column(c).to_pylist() for c in ("user", "item")]))
    assert all(pairs("a", s) == pairs("b", s) for s in ("train", "valid", "test"))
    assert pairs("a", "test") != pairs("c", "test")            # the seed matters


def test_a_bad_row_in_a_later_batch_leaves_nothing_behind(tmp_path):
    rows = 500
    ratings = pa.array([5.0] * (rows - 1) + [None])          # validated while spilling
    pq.write_table(pa.table({"user_id": np.arange(rows) % 37, "item_id": np.arange(rows) % 11,
                             "rating": ratings}), tmp_path / "log.parquet")
    from scale_diffrec.errors import DataError
    with pytest.raises(DataError, match=r"field 'rating', row 499: missing \(null\) rating"):
        prepare(tmp_path / "log.parquet", tmp_path / "ds",
                load_prepare_config(None, ["memory_mib=0.001"]), batch_rows=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.parquet"]


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_memory_mib_must_be_a_positive_number(tmp_path, capsys, value):
    from scale_diffrec.cli import main
    log = _log(tmp_path / "log.parquet", n=50)
    assert main(["prepare", "--input", str(log), "--out", str(tmp_path / "out"),
                 "--set", f"memory_mib={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: --set memory_mib={value}: config key 'memory_mib' "), err
    assert not (tmp_path / "out").exists()
