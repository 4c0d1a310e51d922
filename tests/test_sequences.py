"""Sequences on a hand-made log: time order (ties by row), leave-one-out, left padding,
every train prefix as a sample; errors naming file, field and row."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.data.prepare import prepare
from scale_diffrec.data.prepare_config import load_prepare_config
from scale_diffrec.data.sequences import (load_sequence_log, load_sequence_prepared,
                                          sequences_from_interactions)
from scale_diffrec.errors import DataError

# alice: 13 and 12 share t = 3 (13 is the earlier row), 10 comes back at t = 9;
# bob: exactly 3 items; carol: 2 items (dropped: no train input for valid)
LOG = [("alice", 10, 5), ("bob", 20, 1), ("alice", 13, 3), ("carol", 30, 1),
       ("alice", 11, 1), ("bob", 22, 3), ("alice", 12, 3), ("bob", 21, 2),
       ("carol", 31, 2), ("alice", 10, 9)]
# item indexes: ranks of 10, 11, 12, 13, 20, 21, 22, 30, 31 -> 0..8; pad = 9
ALICE = [1, 3, 2, 0, 0]         # 11 (t1), 13 (t3, row 2), 12 (t3, row 6), 10 (t5), 10 (t9)
BOB = [4, 5, 6]
PAD = 9


def write_log(path, rows, timestamp=True):
    cols = {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows]}
    if timestamp:
        cols["timestamp"] = [r[2] for r in rows]
    pq.write_table(pa.table(cols), path)
    return path


def official_samples(train, max_len):
    """(tokens, target) of every train prefix, as src/utils.py Data_Train builds them."""
    out = []
    for end in range(1, len(train)):
        tokens = train[:end][-max_len:]
        out.append(([PAD] * (max_len - len(tokens)) + tokens, train[end]))
    return out


@pytest.fixture
def seqs(tmp_path):
    return load_sequence_log(write_log(tmp_path / "log.parquet", LOG))


def test_time_order_ties_by_row_repeats_kept_short_users_dropped(seqs):
    assert seqs.n_users == 2 and seqs.n_items == 9 and seqs.pad == PAD
    assert list(seqs.user_ids) == ["alice", "bob"]
    assert list(seqs.item_ids) == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert seqs.items.tolist() == ALICE + BOB and seqs.offsets.tolist() == [0, 5, 8]
    assert seqs.meta["dropped_users"] == 1 and seqs.meta["dropped_rows"] == 2


def test_without_timestamps_the_row_order_is_the_time_order(tmp_path):
    s = load_sequence_log(write_log(tmp_path / "log.parquet", LOG, timestamp=False))
    assert s.items.tolist() == [0, 3, 1, 2, 0] + [4, 6, 5]


def test_every_train_prefix_is_a_sample_left_padded(seqs):
    positions = seqs.train_positions()
    assert positions.tolist() == [1, 2]            # alice's train 1, 3, 2; bob's train: 4
    for max_len in (2, 4):
        inputs, targets = seqs.batch(positions, max_len)
        expected = official_samples(ALICE[:3], max_len)
        assert inputs.tolist() == [e[0] for e in expected]
        assert targets.tolist() == [e[1] for e in expected]
    inputs, _ = seqs.batch(positions, 2)
    assert inputs.tolist() == [[PAD, 1], [1, 3]]


def test_leave_one_out_inputs_and_targets(seqs):
    inputs, targets = seqs.batch(seqs.eval_positions("valid"), 4)
    assert inputs.tolist() == [[PAD, 1, 3, 2], [PAD, PAD, PAD, 4]]
    assert targets.tolist() == [0, 5]
    inputs, targets = seqs.batch(seqs.eval_positions("test"), 4)
    assert inputs.tolist() == [[1, 3, 2, 0], [PAD, PAD, 4, 5]]
    assert targets.tolist() == [0, 6]
    inputs, _ = seqs.batch(seqs.eval_positions("test"), 2)   # the last max_len items
    assert inputs.tolist() == [[2, 0], [4, 5]]
    with pytest.raises(ValueError, match="split"):
        seqs.eval_positions("train")


def test_history_of_the_eval_inputs(seqs):
    valid, test = seqs.history("valid"), seqs.history("test")
    assert valid.shape == test.shape == (2, 9)
    assert [valid.row(u).tolist() for u in range(2)] == [[1, 2, 3], [4]]
    assert [test.row(u).tolist() for u in range(2)] == [[0, 1, 2, 3], [4, 5]]


def test_batches_cover_shuffled_positions_once():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 600)
    s = sequences_from_interactions(users, rng.integers(0, 30, 600), 40, 30,
                                    times=rng.integers(0, 50, 600))
    positions = rng.permutation(s.train_positions())
    assert len(positions) == int((s.lengths() - 3).sum())
    batches = list(s.iter_batches(positions, 64, max_len=7))
    assert [len(t) for _, t in batches] == [64] * (len(positions) // 64) + [len(positions) % 64]
    inputs = np.concatenate([i.numpy() for i, _ in batches])
    targets = np.concatenate([t.numpy() for _, t in batches])
    assert inputs.shape == (len(positions), 7) and targets.tolist() == s.items[positions].tolist()
    # each row: the items before its target in the same user, padded on the left
    for row, g in zip(inputs[:50], positions[:50]):
        u = np.searchsorted(s.offsets, g, side="right") - 1
        before = s.items[max(s.offsets[u], g - 7):g].tolist()
        assert row.tolist() == [s.pad] * (7 - len(before)) + before


def test_bad_rows_are_named(tmp_path):
    bad = LOG[:4] + [("alice", -3, 2)]
    with pytest.raises(DataError, match=r"log.parquet, field 'item_id', row 4: negative id -3"):
        load_sequence_log(write_log(tmp_path / "log.parquet", bad))
    with pytest.raises(DataError, match=r"few.parquet: no user has the 3 interactions"):
        load_sequence_log(write_log(tmp_path / "few.parquet", LOG[3:4] + LOG[8:9]))
    with pytest.raises(ValueError, match="min_items"):
        sequences_from_interactions(np.zeros(3, int), np.arange(3), 1, 3, min_items=2)


def test_prepared_leave_one_out_directory(tmp_path):
    # u1: 5 (t1), then 7 and 6 at t2 (7 logged first), 8 (t3); u2: 2 items (dropped);
    # u3: 6, 5, 8 -> through `prepare` (dedupe, leave-one-out) and back as sequences
    rows = [("u1", 5, 1), ("u2", 5, 1), ("u1", 7, 2), ("u3", 6, 1), ("u1", 6, 2),
            ("u3", 5, 2), ("u1", 8, 3), ("u2", 6, 2), ("u3", 8, 3), ("u1", 5, 4)]
    log = write_log(tmp_path / "log.parquet", rows)
    prepare(log, tmp_path / "loo", load_prepare_config(None, ["split.rule=leave_one_out"]))
    s = load_sequence_prepared(tmp_path / "loo")
    # items 5, 6, 7, 8 -> 0..3; u1's repeated 5 (t4) is deduped to its first time
    assert list(s.user_ids) == ["u1", "u3"] and list(s.item_ids) == [5, 6, 7, 8]
    assert s.items.tolist() == [0, 2, 1, 3] + [1, 0, 3] and s.meta["dropped_users"] == 1
    valid = pq.read_table(tmp_path / "loo" / "valid.parquet")
    pq.write_table(valid.slice(1), tmp_path / "loo" / "valid.parquet")     # u1's row gone
    with pytest.raises(DataError, match=r"valid.parquet: user 0 has 0 rows, leave-one-out"):
        load_sequence_prepared(tmp_path / "loo")
    prepare(log, tmp_path / "time", load_prepare_config(
        None, ["split.rule=time", "split.valid=0.3", "split.test=0.3"]))
    with pytest.raises(DataError, match=r"dataset.json, field 'config.split.rule': sequences "
                                        r"need a leave-one-out split.*'time'"):
        load_sequence_prepared(tmp_path / "time")
