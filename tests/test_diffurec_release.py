"""The DiffuRec authors' released datasets: npz == pickle, the counts of PROVENANCE.txt,
the official train/valid/test inputs; hand-made files with errors naming field and row."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from scale_diffrec.data.diffurec_release import load_diffurec_release
from scale_diffrec.errors import DataError

# SCALE_DIFFREC_SHARED_DATA: the shared data folder when it is not at ../shared/data
SHARED = Path(os.environ.get("SCALE_DIFFREC_SHARED_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
RELEASE = SHARED / "diffurec"
needs_release = pytest.mark.skipif(not (RELEASE / "toys" / "interactions.npz").is_file(),
                                   reason=f"released DiffuRec data not found at {RELEASE}")


def pad_left(tokens, max_len, pad):
    tokens = tokens[-max_len:]
    return [pad] * (max_len - len(tokens)) + tokens


@needs_release
def test_toys_npz_equals_pickle_and_counts():
    s = load_diffurec_release(RELEASE / "toys")
    p = load_diffurec_release(RELEASE / "toys" / "dataset.pkl")
    assert s.name == "toys" and s.meta["path"].endswith("interactions.npz")
    np.testing.assert_array_equal(s.items, p.items)
    np.testing.assert_array_equal(s.offsets, p.offsets)
    np.testing.assert_array_equal(s.user_ids, p.user_ids)
    np.testing.assert_array_equal(s.item_ids, p.item_ids)
    # PROVENANCE.txt: 19,412 users, 11,924 items, 167,597 interactions, 128,773 train
    assert (s.n_users, s.n_items, len(s.items)) == (19412, 11924, 167597)
    assert len(s.train_positions()) == 128773 - 19412           # one per train item but the first
    assert s.pad == 11924 and s.items.min() == 0 and s.items.max() == 11923


@needs_release
def test_toys_batches_equal_the_official_inputs():
    with open(RELEASE / "toys" / "dataset.pkl", "rb") as f:
        raw = pickle.load(f)                  # plain dicts (PROVENANCE.txt)
    s = load_diffurec_release(RELEASE / "toys")
    users = np.random.default_rng(0).choice(s.n_users, 50, replace=False)
    # official item i is index i - 1; padding 0 is index n_items
    idx = lambda seq: [i - 1 for i in seq]    # noqa: E731
    for split, inputs_of in (("valid", lambda u: raw["train"][u]),
                             ("test", lambda u: raw["train"][u] + raw["val"][u])):
        inputs, targets = s.batch(s.eval_positions(split)[users], 50)
        answers = raw["val"] if split == "valid" else raw["test"]
        assert targets.tolist() == [answers[u][0] - 1 for u in users]
        assert inputs.tolist() == [pad_left(idx(inputs_of(u)), 50, s.pad) for u in users]
    positions = s.train_positions()
    starts = np.searchsorted(positions, s.offsets[users] + 1)   # each user's first sample
    for u, first in zip(users[:10], starts[:10]):
        train = idx(raw["train"][u])
        inputs, targets = s.batch(positions[first:first + len(train) - 1], 50)
        assert targets.tolist() == train[1:]
        assert inputs.tolist() == [pad_left(train[:k], 50, s.pad) for k in range(1, len(train))]


def write_npz(path, **overrides):
    # two users: 0 has items 1, 2, 3; 1 has items 2, 3, 1, 3
    cols = {"user": np.array([0, 0, 0, 1, 1, 1, 1], np.int32),
            "item": np.array([1, 2, 3, 2, 3, 1, 3], np.int32),
            "pos": np.array([0, 1, 2, 0, 1, 2, 3], np.int32),
            "split": np.array([0, 1, 2, 0, 0, 1, 2], np.int8),
            "umap": np.array([[7, 0], [5, 1]]), "smap": np.array([[30, 3], [10, 1], [20, 2]])}
    cols.update(overrides)
    np.savez(path, **cols)
    return path


def test_hand_made_npz(tmp_path):
    s = load_diffurec_release(write_npz(tmp_path / "interactions.npz"))
    assert s.items.tolist() == [0, 1, 2, 1, 2, 0, 2] and s.offsets.tolist() == [0, 3, 7]
    assert s.user_ids.tolist() == [7, 5] and s.item_ids.tolist() == [10, 20, 30]
    assert s.train_positions().tolist() == [4]
    inputs, targets = s.batch(s.eval_positions("test"), 3)
    assert inputs.tolist() == [[3, 0, 1], [1, 2, 0]] and targets.tolist() == [2, 2]


@pytest.mark.parametrize("overrides,message", [
    ({"item": np.array([1, 2, 4, 2, 3, 1, 3])},
     r"field 'item', row 2: user 0, position 2: item 4 is not in 1..3"),
    ({"pos": np.array([0, 1, 2, 0, 2, 1, 3])},
     r"field 'pos', row 4: user 1, position 2: expected position 1"),
    ({"split": np.array([0, 1, 2, 0, 1, 0, 2])},
     r"field 'split', row 4: user 1, position 1: split 1 where leave-one-out has 0"),
    ({"user": np.array([0, 0, 1, 1, 1, 1, 0])}, r"field 'user', row 6: .*ordered by user"),
    ({"smap": np.array([[30, 3], [10, 1], [20, 1]])}, r"field 'smap', row 2: new ids must be 1..3"),
    ({"split": np.array([0.0, 1, 2, 0, 0, 1, 2])}, r"field 'split': expected a 1-D integer"),
    ({"user": np.array([0, 0, 1, 1, 1, 1, 1]), "pos": np.array([0, 1, 0, 1, 2, 3, 4]),
      "split": np.array([0, 2, 0, 0, 0, 1, 2])}, r"field 'user': user 0 has 2 items"),
])
def test_bad_npz_names_field_and_row(tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        load_diffurec_release(write_npz(tmp_path / "interactions.npz", **overrides))


def test_pickle_hand_made_and_refusals(tmp_path):
    raw = {"train": {1: [2, 3], 0: [1]}, "val": {0: [2], 1: [1]}, "test": {0: [3], 1: [3]},
           "umap": {7: 0, 5: 1}, "smap": {10: 1, 20: 2, 30: 3}}
    path = tmp_path / "dataset.pkl"
    path.write_bytes(pickle.dumps(raw))
    s = load_diffurec_release(tmp_path)
    assert s.items.tolist() == [0, 1, 2, 1, 2, 0, 2] and s.offsets.tolist() == [0, 3, 7]
    path.write_bytes(pickle.dumps({**raw, "val": {0: [2], 1: [1, 2]}}))
    with pytest.raises(DataError, match=r"field 'val': user 1: expected a list of one item id"):
        load_diffurec_release(path)
    path.write_bytes(pickle.dumps({**raw, "smap": {10: 1, 20: 2, 30: 4}}))
    with pytest.raises(DataError, match=r"field 'smap', row 2: new ids must be 1..3"):
        load_diffurec_release(path)
    path.write_bytes(pickle.dumps({**raw, "umap": Path("x")}))      # a class: refused
    with pytest.raises(DataError, match=r"dataset.pkl: not a readable plain-dict pickle: "
                                        r"refused class pathlib"):
        load_diffurec_release(path)
    with pytest.raises(DataError, match="file not found"):
        load_diffurec_release(tmp_path / "nowhere")
