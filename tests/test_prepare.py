"""``scale-diffrec prepare`` on small hand-made logs: every expected result below is worked
out by hand in the comments (k-core passes, chronological and leave-one-out splits with
ties, the natural-noise setting, dedupe, threshold), plus bad input and the round trip
into ``train``."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.data import load_data
from scale_diffrec.data.prepare import kcore, prepare
from scale_diffrec.data.prepare_config import PrepareConfig, load_prepare_config
from scale_diffrec.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")
ROOT = Path(__file__).resolve().parents[1]
EPINIONS = ROOT / ".." / "shared" / "data" / "tang-trust" / "epinions" / "ratings.parquet"


def write_log(path, rows, columns=("user_id", "item_id", "rating", "timestamp")):
    """rows: tuples in ``columns`` order -> a parquet or CSV file (by suffix)."""
    cols = list(zip(*rows))
    if path.suffix == ".csv":
        lines = [",".join(columns)] + [",".join("" if v is None else str(v) for v in r)
                                       for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table({c: list(v) for c, v in zip(columns, cols)}), path)
    return path


def run(tmp_path, rows, *sets, columns=("user_id", "item_id", "rating", "timestamp"),
        name="log.parquet", out="ds"):
    log = write_log(tmp_path / name, rows, columns)
    cfg = load_prepare_config(None, list(sets))
    stats = prepare(log, tmp_path / out, cfg)
    return stats, read_dir(tmp_path / out)


def read_dir(folder):
    """{split: [(original user, original item), ...] in file order}."""
    users = pq.read_table(folder / "user_ids.parquet").column("user_id").to_pylist()
    items = pq.read_table(folder / "item_ids.parquet").column("item_id").to_pylist()
    out = {}
    for split in SPLITS:
        t = pq.read_table(folder / f"{split}.parquet")
        out[split] = [(users[u], items[i]) for u, i in
                      zip(t.column("user").to_pylist(), t.column("item").to_pylist())]
    return out


def of_user(split_pairs, user):
    return [i for u, i in split_pairs if u == user]


# ------------------------------------------------------------------------------ k-core

# Core: users 1, 2, 5 x items 1, 2, 6. Chain: (1,3) (3,3) (3,4) (4,5).
# With kcore users = items = 2, counting on what the previous pass kept:
#   pass 1: user 4 has 1 (drop (4,5)); items 4 and 5 have 1 (drop (3,4), (4,5)) -> 2 removed
#   pass 2: user 3 now has 1, (3,3): it dropped below the core after item 4 went -> 1 removed
#   pass 3: item 3 now has 1, (1,3) -> 1 removed
#   pass 4: users 1, 2, 5 have 3 each, items 1, 2, 6 have 3 each: done.
KCORE_PAIRS = [(u, i) for u in (1, 2, 5) for i in (1, 2, 6)] + [(1, 3), (3, 3), (3, 4), (4, 5)]


def test_kcore_needs_three_passes_and_drops_a_user_after_item_filtering():
    users = np.array([u for u, _ in KCORE_PAIRS])
    items = np.array([i for _, i in KCORE_PAIRS])
    keep, passes = kcore(users, items, 6, 7, 2, 2)
    kept = sorted(p for p, k in zip(KCORE_PAIRS, keep) if k)
    assert kept == sorted((u, i) for u in (1, 2, 5) for i in (1, 2, 6))
    assert passes == [{"removed": 2, "users_below": 1, "items_below": 2},
                      {"removed": 1, "users_below": 1, "items_below": 0},
                      {"removed": 1, "users_below": 0, "items_below": 1}]


def test_kcore_one_sided_and_off():
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 0, 0, 1, 2])
    keep, passes = kcore(users, items, 3, 3, 2, 0)       # user 1 has one interaction
    assert keep.tolist() == [True, True, False, True, True, True] and len(passes) == 1
    keep, passes = kcore(users, items, 3, 3, 0, 0)
    assert keep.all() and passes == []


def test_prepare_kcore_end_to_end_with_leave_one_out(tmp_path):
    # times: user u's item i at 10 * position in (1, 2, 6), chain rows at time 5
    times = {(u, i): 10 * (k + 1) for u in (1, 2, 5) for k, i in enumerate((1, 2, 6))}
    rows = [(u, i, 5, times.get((u, i), 5)) for u, i in KCORE_PAIRS]
    stats, got = run(tmp_path, rows, "kcore.users=2", "kcore.items=2",
                     "split.rule=leave_one_out")
    # leave-one-out per user: oldest (item 1) train, item 2 valid, latest (item 6) test
    for user in (1, 2, 5):
        assert of_user(got["train"], user) == [1]
        assert of_user(got["valid"], user) == [2]
        assert of_user(got["test"], user) == [6]
    assert (stats["users"], stats["items"]) == (3, 3)
    assert stats["steps"]["kcore_removed"] == 4 and len(stats["steps"]["kcore_passes"]) == 3
    assert stats["density"] == pytest.approx(9 / 9)


# -------------------------------------------------------------------------- time split

def test_time_split_orders_equal_timestamps_by_log_row(tmp_path):
    # user 7: ten items; the last three share time 8 and appear in the log as items
    # 30, 20, 10. 7:1:2 of 10 -> 7 train, 1 valid, 2 test. By log row the order is
    # ..., 30, 20, 10: test = {20, 10}, valid = {30} (by item id it would be {20, 30}, {10}).
    # Two items share time 3 at no boundary, so they only need to stay in train.
    user7 = [(7, 100 + k, 5, t) for k, t in enumerate([1, 2, 3, 3, 5, 6, 7])]
    user7 += [(7, 30, 5, 8), (7, 20, 5, 8), (7, 10, 5, 8)]
    # user 8, 3 interactions: n_test = floor(0.6 + .5) = 1, n_valid = floor(0.3 + .5) = 0
    # user 9, 2 interactions: n_test = floor(0.4 + .5) = 0 -> both train
    # user 6, 1 interaction: train
    others = [(8, 1, 5, 50), (8, 2, 5, 40), (8, 3, 5, 60), (9, 1, 5, 1), (9, 2, 5, 2),
              (6, 1, 5, 9)]
    rows = others[:3] + user7[:5] + others[3:] + user7[5:]       # interleaved users
    stats, got = run(tmp_path, rows, "split.rule=time")
    assert of_user(got["test"], 7) == [20, 10]                   # oldest first in files
    assert of_user(got["valid"], 7) == [30]
    assert of_user(got["train"], 7) == [100, 101, 102, 103, 104, 105, 106]
    assert of_user(got["test"], 8) == [3] and of_user(got["train"], 8) == [2, 1]
    assert of_user(got["valid"], 8) == []
    assert of_user(got["train"], 9) == [1, 2] and of_user(got["train"], 6) == [1]
    assert stats["interactions"] == {"train": 7 + 2 + 2 + 1, "valid": 1, "test": 3}


def test_leave_one_out_small_users_and_ties(tmp_path):
    # user 1: items 5 (t=1), then 7 and 6 both at t=2, logged in that order: the tie is
    #         broken by log row -> 6 is the latest: test 6, valid 7, train 5 (by item id
    #         it would be test 7, valid 6)
    # user 2: two interactions -> train + test (valid dropped first); user 3: one -> train
    rows = [(1, 5, 5, 1), (1, 7, 5, 2), (1, 6, 5, 2), (2, 5, 5, 3), (2, 6, 5, 1),
            (3, 6, 5, 1)]
    _, got = run(tmp_path, rows, "split.rule=leave_one_out")
    assert got["test"] == [(1, 6), (2, 5)]
    assert got["valid"] == [(1, 7)]
    assert got["train"] == [(1, 5), (2, 6), (3, 6)]


def test_time_rules_need_timestamps(tmp_path):
    log = write_log(tmp_path / "log.parquet", [(1, 1), (1, 2)], ("user_id", "item_id"))
    with pytest.raises(DataError, match=r"log\.parquet, field 'timestamp': missing column: "
                                        r"split\.rule 'time'"):
        prepare(log, tmp_path / "ds", load_prepare_config(None, ["split.rule=time"]))
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------ random split

def _random_log(order_seed=None):
    # users 1..20, each rating 10 items (20 + u .. 29 + u); shuffled when order_seed given
    rows = [(u, 20 + u + k, 4, 0) for u in range(1, 21) for k in range(10)]
    if order_seed is not None:
        rng = np.random.default_rng(order_seed)
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


def test_random_split_is_seeded_reproducible_and_order_free(tmp_path):
    _, a = run(tmp_path, _random_log(), "split.seed=3", out="a")
    _, b = run(tmp_path, _random_log(), "split.seed=3", out="b")
    _, c = run(tmp_path, _random_log(order_seed=1), "split.seed=3", out="c", name="s.parquet")
    _, d = run(tmp_path, _random_log(), "split.seed=4", out="d")
    assert a == b
    assert {s: set(a[s]) for s in SPLITS} == {s: set(c[s]) for s in SPLITS}
    assert {s: set(a[s]) for s in SPLITS} != {s: set(d[s]) for s in SPLITS}
    for user in range(1, 21):           # 10 each: round(7), round(1), round(2)
        assert [len(of_user(a[s], user)) for s in SPLITS] == [7, 1, 2]
    everything = sorted(p for s in SPLITS for p in a[s])
    assert everything == sorted((u, i) for u, i, _, _ in _random_log())


# ----------------------------------------------------- dedupe, threshold, natural noise

def test_dedupe_first_and_last_decide_the_rating_then_the_threshold(tmp_path):
    # pair (1, 9) rated 5 at t=1 and 2 at t=5 (logged in the reverse order): 'first'
    # keeps the t=1 occurrence (rating 5, kept by threshold 4), 'last' the t=5 one (2,
    # below the threshold). Rating 4 is kept (>=), 3.5 is not.
    base = [(1, k, 4, 10 + k) for k in range(1, 9)]          # 8 more pairs for user 1
    rows = [(1, 9, 2.0, 5), (1, 9, 5.0, 1), (1, 10, 3.5, 2)] + base
    stats, got = run(tmp_path, rows, "rating_threshold=4", out="first")
    pairs = {p for s in SPLITS for p in got[s]}
    assert (1, 9) in pairs and (1, 10) not in pairs and len(pairs) == 9
    assert stats["steps"] == {"duplicates": 1, "below_threshold": 1, "kcore_passes": [],
                              "kcore_removed": 0}
    stats, got = run(tmp_path, rows, "rating_threshold=4", "dedupe=last", out="last")
    pairs = {p for s in SPLITS for p in got[s]}
    assert (1, 9) not in pairs and len(pairs) == 8
    assert stats["steps"]["below_threshold"] == 2
    t = pq.read_table(tmp_path / "first" / "train.parquet").to_pylist() \
        + pq.read_table(tmp_path / "first" / "valid.parquet").to_pylist() \
        + pq.read_table(tmp_path / "first" / "test.parquet").to_pylist()
    kept = [r for r in t if r["rating"] == 5.0]
    assert len(kept) == 1 and kept[0]["timestamp"] == 1       # the first occurrence's own


def test_natural_noise_goes_to_train_and_valid_only(tmp_path):
    # user 1: 10 items rated 5 (items 1..10) and 8 rated 2 (items 1..8 are taken, so
    # items 11..18 would be new items: only items with a rating >= 4 survive, so the
    # noise uses items 21..28 given positives by user 2). share = 0.1 / (1 - 0.2) =
    # 0.125: n_valid = floor(8 * 0.125 + .5) = 1 -> 7 noise pairs in train, 1 in valid.
    # Pair (1, 99) rated 1: item 99 has no rating >= 4 -> dropped with its item.
    rows = [(1, i, 5, i) for i in range(1, 11)]
    rows += [(1, i, 2, 30 + i) for i in range(21, 29)] + [(1, 99, 1, 50)]
    rows += [(2, i, 4, i) for i in range(21, 31)]
    stats, got = run(tmp_path, rows, "rating_threshold=4", "natural_noise=true",
                     "split.rule=time")
    noise = {(1, i) for i in range(21, 29)}
    assert not noise & set(got["test"])
    assert set(got["valid"]) & noise == {(1, 28)}                # the latest noise pair
    assert set(got["train"]) & noise == noise - {(1, 28)}
    assert stats["noise"] == {"train": 7, "valid": 1}
    assert stats["steps"]["noise_dropped"] == 1 and stats["items"] == 20
    # the clean part is exactly the clean split: 10 each -> 7 / 1 / 2, latest in test
    assert of_user(got["test"], 1) == [9, 10] and of_user(got["test"], 2) == [29, 30]
    assert stats["interactions"] == {"train": 14, "valid": 2, "test": 4}
    _, clean = run(tmp_path, rows, "rating_threshold=4", "split.rule=time", out="clean")
    assert clean["test"] == got["test"]
    assert set(clean["train"]) == set(got["train"]) - noise


def test_natural_noise_random_rule_is_seeded(tmp_path):
    rows = [(1, i, 5, 0) for i in range(1, 11)] + [(1, i, 1, 0) for i in range(11, 19)]
    rows += [(2, i, 5, 0) for i in range(11, 21)]
    stats, got = run(tmp_path, rows, "rating_threshold=4", "natural_noise=true")
    assert stats["noise"] == {"train": 7, "valid": 1}
    noise = {(1, i) for i in range(11, 19)}
    assert not noise & set(got["test"])
    _, again = run(tmp_path, rows, "rating_threshold=4", "natural_noise=true", out="again")
    assert again == got


# ----------------------------------------------------------------- CSV and parquet input

def test_csv_and_parquet_give_the_same_dataset(tmp_path):
    rows = _random_log(order_seed=2)
    run(tmp_path, rows, "rating_threshold=4", name="log.csv", out="from_csv")
    run(tmp_path, rows, "rating_threshold=4", name="log.parquet", out="from_parquet")
    for file in ("train.parquet", "valid.parquet", "test.parquet", "user_ids.parquet",
                 "item_ids.parquet"):
        a = pq.read_table(tmp_path / "from_csv" / file)
        b = pq.read_table(tmp_path / "from_parquet" / file)
        assert a.equals(b), file


def test_csv_string_ids_and_iso_timestamps_keep_original_ids(tmp_path):
    rows = [("ann", item, 5, f"2024-01-0{day}") for item, day in zip("xyzw", (1, 2, 3, 4))]
    _, got = run(tmp_path, rows, "split.rule=leave_one_out", name="log.csv")
    assert got == {"train": [("ann", "x"), ("ann", "y")], "valid": [("ann", "z")],
                   "test": [("ann", "w")]}


def test_csv_ids_with_leading_zeros_are_kept_apart(tmp_path):
    rows = [("u1", item, 5, day) for item, day in zip(("007", "7", "0042", "42"), (1, 2, 3, 4))]
    _, got = run(tmp_path, rows, "split.rule=leave_one_out", name="log.csv")
    assert got == {"train": [("u1", "007"), ("u1", "7")], "valid": [("u1", "0042")],
                   "test": [("u1", "42")]}


def test_csv_ids_not_written_as_integers_after_the_first_block_are_refused(tmp_path):
    from scale_diffrec.data.csv_log import CsvLog
    from scale_diffrec.data.parquet import read_interactions
    rows = [(u, 1, 5, u) for u in range(200)] + [("007", 2, 5, 300)]
    log = CsvLog(write_log(tmp_path / "log.csv", rows), block_bytes=256)
    with pytest.raises(DataError, match=r"field 'user_id', row 200: id '007' is not written "
                                        r"as a plain integer"):
        read_interactions(log)


# -------------------------------------------------------------------------- bad input

def _cli(tmp_path, log, *sets, flags=()):
    args = ["prepare", "--input", str(log), "--out", str(tmp_path / "out"), *flags]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.parametrize("name, text, pattern", [
    ("a.csv", "user_id,rating\n1,5\n", r"a\.csv, field 'item_id': missing column"),
    ("a.csv", "user_id,item_id,rating\n1,2,5\n1,3,5\n,4,5\n",
     r"a\.csv, field 'user_id', row 2: missing \(null\) id"),
    ("a.csv", "user_id,item_id,rating\n1,2,5\n1,3,good\n",
     r"a\.csv, field 'rating', row 1: cannot read 'good' as"),
    ("a.csv", "", r"a\.csv: empty file"),
    ("a.csv", "user_id,item_id,rating\n", r"a\.csv: no interactions"),
    ("a.csv", "user_id,item_id,rating\n1,2,5\n1,-3,5\n",
     r"a\.csv, field 'item_id', row 1: negative id -3"),
])
def test_bad_csv_is_one_line_exit_2_nothing_written(tmp_path, capsys, name, text, pattern):
    (tmp_path / name).write_text(text)
    assert _cli(tmp_path, tmp_path / name, "rating_threshold=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]   # no temporary left


@pytest.mark.parametrize("table, pattern", [
    (pa.table({"user_id": [1, 2], "rating": [5, 5]}), r"field 'item_id': missing column"),
    (pa.table({"user_id": [1, None], "item_id": [1, 2], "rating": [5, 5]}),
     r"field 'user_id', row 1: missing \(null\) id"),
    (pa.table({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "rating": ["5", "4", "x"]}),
     r"field 'rating', row 2: cannot read 'x' as double"),
    (pa.table({"user_id": [1], "item_id": [1], "rating": [[1]]}),
     r"field 'rating': ratings must be numbers"),
    (pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
               "rating": pa.array([], pa.int8())}), r"no interactions"),
    (pa.table({"user_id": [1, 2], "item_id": [1, 2]}),
     r"field 'rating': missing column: rating_threshold = 4"),
])
def test_bad_parquet_is_one_line_exit_2_nothing_written(tmp_path, capsys, table, pattern):
    pq.write_table(table, tmp_path / "log.parquet")
    assert _cli(tmp_path, tmp_path / "log.parquet", "rating_threshold=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'log.parquet'}"), err
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sets, pattern", [
    (["kcore.user=2"], r"--set kcore\.user=2: unknown config key 'kcore\.user'"),
    (["split.rule=sequential"], r"config key 'split\.rule' must be one of 'random', 'time'"),
    (["split.valid=0.5", "split.test=0.5"],
     r"config key 'split\.valid' \+ 'split\.test' must be < 1"),
    (["natural_noise=true"], r"config key 'natural_noise' needs rating_threshold"),
    (["kcore.users=-1"], r"--set kcore\.users=-1: config key 'kcore\.users' must be >= 0"),
    (["dedupe=maybe"], r"config key 'dedupe' must be one of 'first' or 'last'"),
])
def test_bad_config_names_the_key(tmp_path, capsys, sets, pattern):
    log = write_log(tmp_path / "log.parquet", _random_log())
    assert _cli(tmp_path, log, *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite_and_a_failed_run_keeps_it(tmp_path, capsys):
    log = write_log(tmp_path / "log.parquet", _random_log())
    assert _cli(tmp_path, log) == 0
    before = (tmp_path / "out" / "train.parquet").read_bytes()
    assert _cli(tmp_path, log, "split.seed=5") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    bad = write_log(tmp_path / "bad.parquet", [(1, 1, None, 0)])
    assert _cli(tmp_path, bad, flags=["--overwrite"]) == 2
    assert (tmp_path / "out" / "train.parquet").read_bytes() == before
    assert _cli(tmp_path, log, "split.seed=5", flags=["--overwrite"]) == 0
    assert (tmp_path / "out" / "train.parquet").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "log.parquet", "out"]


def test_empty_split_is_an_error(tmp_path):
    # every user has 2 interactions: 7:1:2 rounds valid and test to 0
    log = write_log(tmp_path / "log.parquet", [(u, i, 5, 0) for u in (1, 2) for i in (1, 2)])
    with pytest.raises(DataError, match=r"the valid split is empty"):
        prepare(log, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "p.yaml").write_text("rating_threshold: 4\nsplit: {rule: time, seed: 2}\n")
    cfg = load_prepare_config(tmp_path / "p.yaml", ["split.seed=7", "kcore.items=3"])
    assert cfg == PrepareConfig(rating_threshold=4.0, kcore={"items": 3},
                                split={"rule": "time", "seed": 7})
    # an error names where the key was set: the override, else the file
    with pytest.raises(ConfigError, match=r"^--set split\.seed=-1: config key 'split\.seed'"):
        load_prepare_config(tmp_path / "p.yaml", ["split.seed=-1"])
    (tmp_path / "p.yaml").write_text("split: {rule: sometimes}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: config key 'split\.rule' must be one of"):
        load_prepare_config(tmp_path / "p.yaml", ["split.seed=7"])


# ---------------------------------------------------------------------- into training

def test_train_reads_the_prepared_directory(tmp_path, capsys):
    rows = [(f"u{u}", 1000 + (u * 7 + k * 3) % 40, 4 + (k % 2), u * 100 + k)
            for u in range(60) for k in range(10)]
    log = write_log(tmp_path / "log.csv", rows)
    assert main(["prepare", "--input", str(log), "--out", str(tmp_path / "ds"),
                 "--set", "rating_threshold=4", "--set", "split.rule=time"]) == 0
    cfg = load_config(None, ["data.source=dataset", f"data.path={tmp_path / 'ds'}"])
    data = load_data(cfg)
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert (data.n_users, data.n_items) == (stats["users"], stats["items"]) == (60, 40)
    assert [m.nnz for m in (data.train, data.valid, data.test)] == \
        [stats["interactions"][s] for s in SPLITS] == [420, 60, 120]
    assert data.user_ids[0] == "u0" and data.item_ids[0] == 1000
    # train_times are each pair's own timestamp (user u's k-th item at u * 100 + k)
    u0 = data.train.row(0)
    expected = {1000 + (k * 3) % 40: k for k in range(10)}
    assert data.train_times[:len(u0)].tolist() == [expected[data.item_ids[i]] for i in u0]
    args = ["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "run")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for s in ["data.source=dataset", f"data.path={tmp_path / 'ds'}", "model=multvae",
              "epochs=1", "batch_size=32", "eval_every=1", "topk=[10, 20]",
              "multvae.dims=[8, 16]"]:
        args += ["--set", s]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["recall@20"] <= 1.0


def test_prepared_directory_errors(tmp_path):
    cfg = load_config(None, ["data.source=dataset", f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match=r"nope: prepared dataset folder not found"):
        load_data(cfg)
    log = write_log(tmp_path / "log.parquet", _random_log())
    prepare(log, tmp_path / "ds")
    t = pq.read_table(tmp_path / "ds" / "test.parquet")
    users = t.column("user").to_numpy().copy()
    users[3] = 20                                        # 20 users: indexes 0..19
    pq.write_table(t.set_column(0, "user", pa.array(users)), tmp_path / "ds" / "test.parquet")
    cfg = load_config(None, ["data.source=dataset", f"data.path={tmp_path / 'ds'}"])
    with pytest.raises(DataError, match=r"test\.parquet, field 'user', row 3: index 20 is "
                                        r"not below the dataset's 20 users"):
        load_data(cfg)


def test_epinions_config_matches_an_independent_count(tmp_path, epinions=EPINIONS):
    """configs/epinions-prepare.yaml on the real log: users, items and interactions equal
    a direct count (first row of each (user, item) pair, rating >= 4), every user's split
    sizes follow the 7:1:2 rounding, and the id maps give the log's ids back."""
    if not Path(epinions).is_file():
        pytest.skip(f"{epinions} not found (the shared Epinions log)")
    stats = prepare(epinions, tmp_path / "ds",
                    load_prepare_config(ROOT / "configs" / "epinions-prepare.yaml"))
    t = pq.read_table(epinions, columns=["user_id", "item_id", "rating"])
    u, i = t.column("user_id").to_numpy(), t.column("item_id").to_numpy()
    r = t.column("rating").to_numpy()
    key = u.astype(np.int64) * (int(i.max()) + 1) + i
    _, first = np.unique(key, return_index=True)                 # first row of each pair
    good = first[r[first] >= 4]
    assert stats["input"]["rows"] == len(u)
    assert stats["steps"]["duplicates"] == len(u) - len(first)
    assert (stats["users"], stats["items"]) == (len(np.unique(u[good])), len(np.unique(i[good])))
    assert sum(stats["interactions"].values()) == len(good)
    data = load_data(load_config(None, ["data.source=dataset", f"data.path={tmp_path / 'ds'}"]))
    n = np.bincount(u[good]); n = n[n > 0]                        # per user, sorted id order
    n_test, n_valid = np.floor(0.2 * n + 0.5), np.floor(0.1 * n + 0.5)
    assert data.test.row_lengths().tolist() == np.minimum(n_test, n - 1).tolist()
    assert data.valid.row_lengths().tolist() == \
        np.minimum(n_valid, np.maximum(n - 1 - n_test, 0)).tolist()
    assert data.user_ids.tolist() == np.unique(u[good]).tolist()
    row = data.train.row(0)
    assert set(data.item_ids[row]) <= set(i[good][u[good] == data.user_ids[0]])


def test_prepare_benchmark_runs_on_a_small_synthetic_log(tmp_path):
    out = tmp_path / "prepare.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare.py"),
                           "--rows", "30000", "--users", "500", "--items", "400",
                           "--epinions", str(tmp_path / "absent.parquet"),
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["log"] == "synthetic" and run["rows"] == 30000
    assert run["peak_rss_mib"] >= run["import_rss_mib"] > 0 and run["seconds"] > 0
    # every row is accounted for: duplicates, below 4, k-core, or in the dataset
    steps = run["steps"]
    kept = sum(run["interactions"].values())
    assert steps["duplicates"] + steps["below_threshold"] + steps["kcore_removed"] + kept \
        == 30000
    assert sum(run["noise"].values()) + steps["noise_dropped"] == steps["below_threshold"]
