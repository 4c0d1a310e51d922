"""Full-ranking evaluation: masking, splits, batch-size invariance, precomputed top-K lists."""
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_diffrec.data.csr import CSR
from scale_diffrec.data.dataset import InteractionData
from scale_diffrec.evaluate import evaluate, evaluate_topk, topk_excluding
from scale_diffrec.models.base import Recommender

DIFFREC_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diffrec"


class FixedScores(Recommender):
    """score() returns the next rows of a fixed [n_users, n_items] matrix (the evaluator
    walks users 0 .. n_users - 1 in order); records the mode it was called in."""

    def __init__(self, scores):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(scores, dtype=torch.float32))
        self.cursor = 0
        self.calls = []

    def score(self, batch):
        b = batch.batch_size
        self.calls.append((b, self.training, torch.is_grad_enabled()))
        out = self.table[self.cursor: self.cursor + b].clone()
        self.cursor = (self.cursor + b) % self.table.shape[0]
        return out


def _csr(rows_of_items, n_items):
    rows = [r for r, items in enumerate(rows_of_items) for _ in items]
    cols = [c for items in rows_of_items for c in items]
    return CSR.from_pairs(np.array(rows, np.int64), np.array(cols, np.int64),
                          len(rows_of_items), n_items)


def _data(train, valid, test, n_items):
    return InteractionData("tiny", _csr(train, n_items), _csr(valid, n_items),
                           _csr(test, n_items))


def _random_data(seed=0, n_users=97, n_items=150, p_empty=0.15):
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for _ in range(n_users):
        items = rng.permutation(n_items)[: rng.integers(3, 40)]
        cut1, cut2 = int(len(items) * 0.7), int(len(items) * 0.85)
        train.append(items[:cut1])
        valid.append(items[cut1:cut2] if rng.random() > p_empty else [])
        test.append(items[cut2:] if rng.random() > p_empty else [])
    return _data(train, valid, test, n_items), rng.standard_normal((n_users, n_items))


def test_tiny_case_by_hand_with_masking_of_train_and_valid():
    # 1 user, 6 items. scores: item 0 best, then 1, 2, 3, 4, 5.
    # train {0}, valid {2}, test {3}.
    data = _data([[0]], [[2]], [[3]], n_items=6)
    scores = [[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]]
    # valid: train item 0 masked -> ranking [1, 2, 3, 4, 5, -1]; GT {2} hit at rank 1
    out = evaluate(FixedScores(scores), data, "valid", ks=(1, 2))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 / math.log2(2)))
    assert out["mrr@2"] == pytest.approx(1 / 2) and out["precision@2"] == pytest.approx(1 / 2)
    # test: train 0 and valid 2 masked -> ranking [1, 3, 4, 5]; GT {3} hit at rank 1
    out = evaluate(FixedScores(scores), data, "test", ks=(1, 2))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0
    assert out["mrr@2"] == pytest.approx(1 / 2)
    # if valid items were not masked for test, item 2 would sit at rank 1 and push 3 out
    assert out["n_users"] == 1 and out["n_users_with_truth"] == 1
    assert out["convention"] == "reference"


def test_train_item_with_the_highest_score_never_appears():
    data, scores = _random_data(seed=1)
    for u in range(data.n_users):                      # train items score highest of all
        scores[u, data.train.row(u)] = 1e6
    scores = torch.tensor(scores, dtype=torch.float32)
    for split, masked in (("valid", [data.train]), ("test", [data.train, data.valid])):
        items, vals = topk_excluding(scores, masked, 100)
        assert items.shape == (data.n_users, 100) and vals.shape == (data.n_users, 100)
        for u in range(data.n_users):
            seen = set(np.concatenate([m.row(u) for m in masked]).tolist())
            row = items[u].tolist()
            assert not seen & set(row)
            ranked = [i for i in row if i >= 0]
            assert len(ranked) == min(100, data.n_items - len(seen))
            assert len(set(ranked)) == len(ranked)
            assert torch.all(vals[u, : len(ranked)][:-1] >= vals[u, : len(ranked)][1:])


def test_topk_excluding_pads_when_too_few_items_and_keeps_input():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    before = scores.clone()
    items, vals = topk_excluding(scores, _csr([[1, 3]], 4), 6)
    assert items.tolist() == [[2, 0, -1, -1, -1, -1]]
    assert vals[0, :2].tolist() == pytest.approx([0.5, 0.1])
    assert torch.isinf(vals[0, 2:]).all() and (vals[0, 2:] < 0).all()
    assert torch.equal(scores, before)
    # a model's own -inf ties with masked items: the masked item still never shows
    scores = torch.tensor([[float("-inf"), 1.0, float("-inf")]])
    items, _ = topk_excluding(scores, _csr([[2]], 3), 3)
    assert 2 not in items[0].tolist() and items[0, 0] == 1


def test_users_without_truth_change_only_the_reference_convention():
    data, scores = _random_data(seed=2, p_empty=0.0)
    n = data.n_users
    # the same users plus 10 users with train items only
    extra = _data([data.train.row(u) for u in range(n)] + [[0, 1]] * 10,
                  [data.valid.row(u) for u in range(n)] + [[]] * 10,
                  [data.test.row(u) for u in range(n)] + [[]] * 10, data.n_items)
    extra_scores = np.concatenate([scores, np.zeros((10, data.n_items))])
    for split in ("valid", "test"):
        a = {c: evaluate(FixedScores(scores), data, split, convention=c)
             for c in ("reference", "users_with_truth")}
        b = {c: evaluate(FixedScores(extra_scores), extra, split, convention=c)
             for c in ("reference", "users_with_truth")}
        assert a["reference"]["n_users"] == n and b["reference"]["n_users"] == n + 10
        assert b["reference"]["n_users_with_truth"] == a["reference"]["n_users_with_truth"]
        for key in ("recall@20", "ndcg@20", "precision@10", "mrr@100"):
            assert b["users_with_truth"][key] == pytest.approx(a["users_with_truth"][key],
                                                               abs=1e-12)
            assert b["reference"][key] == pytest.approx(a["reference"][key] * n / (n + 10),
                                                        abs=1e-12)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_batch_size_invariance_and_eval_mode(split):
    data, scores = _random_data(seed=3)
    outs = []
    for bs in (1, 7, 32, 1000):
        model = FixedScores(scores)
        model.train()
        outs.append(evaluate(model, data, split, batch_size=bs))
        assert model.training                                  # mode restored
        assert all(not training and not grad for _, training, grad in model.calls)
        assert sum(b for b, _, _ in model.calls) == data.n_users
        assert max(b for b, _, _ in model.calls) == min(bs, data.n_users)
    for out in outs[1:]:
        assert out.keys() == outs[0].keys()
        for key, value in outs[0].items():
            assert out[key] == (pytest.approx(value, abs=1e-12)
                                if isinstance(value, float) else value), key


def _slow_evaluate(scores, data, split, ks, convention):
    """Dense, one user at a time: mask, argsort, the reference formulas in plain Python."""
    truth_m = data.valid if split == "valid" else data.test
    masked = [data.train] + ([data.valid] if split == "test" else [])
    sums, with_truth = {}, 0
    for u in range(data.n_users):
        s = np.array(scores[u], dtype=np.float32)
        for m in masked:
            s[m.row(u)] = -np.inf
        order = [int(i) for i in np.argsort(-s, kind="stable") if np.isfinite(s[i])]
        gt = set(truth_m.row(u).tolist())
        if not gt:
            continue
        with_truth += 1
        for k in ks:
            top = order[:k]
            hits = [j for j, i in enumerate(top) if i in gt]
            dcg = sum(1 / math.log2(j + 2) for j in hits)
            idcg = sum(1 / math.log2(j + 2) for j in range(min(len(gt), k)))
            vals = {"recall": len(hits) / len(gt), "precision": len(hits) / k,
                    "ndcg": dcg / idcg, "mrr": 1 / (hits[0] + 1) if hits else 0.0}
            for name, v in vals.items():
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
    denom = data.n_users if convention == "reference" else with_truth
    return {key: v / denom for key, v in sums.items()}


@pytest.mark.parametrize("convention", ["reference", "users_with_truth"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_equals_slow_dense_loop(split, convention):
    data, scores = _random_data(seed=4)
    ks = (10, 20, 50, 100)
    fast = evaluate(FixedScores(scores), data, split, ks=ks, convention=convention,
                    batch_size=13)
    slow = _slow_evaluate(scores, data, split, ks, convention)
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_topk_of_precomputed_lists_equals_evaluate(split):
    data, scores = _random_data(seed=5)
    masked = [data.train] + ([data.valid] if split == "test" else [])
    items, _ = topk_excluding(torch.tensor(scores, dtype=torch.float32), masked, 100)
    for conv in ("reference", "users_with_truth"):
        direct = evaluate(FixedScores(scores), data, split, convention=conv)
        for topk in (items, items.numpy()):
            # same batching as evaluate: bit-identical
            assert evaluate_topk(topk, data, split, convention=conv) == direct
            # another batching: equal up to float64 summation order
            other = evaluate_topk(topk, data, split, convention=conv, batch_size=10)
            for key, value in direct.items():
                assert other[key] == (pytest.approx(value, abs=1e-12)
                                      if isinstance(value, float) else value), key



def test_bad_arguments():
    data, scores = _random_data(seed=6, n_users=5)
    with pytest.raises(ValueError, match="split"):
        evaluate(FixedScores(scores), data, "train")
    with pytest.raises(ValueError, match="convention"):
        evaluate(FixedScores(scores), data, "valid", convention="mean")
    with pytest.raises(ValueError, match="rows"):
        evaluate_topk(np.zeros((3, 100), np.int64), data, "valid")


def _load_npy_split(folder):
    parts = {s: np.load(folder / f"{s}_list.npy", allow_pickle=True) for s in
             ("train", "valid", "test")}
    n_users = max(int(p[:, 0].max()) for p in parts.values()) + 1
    n_items = max(int(p[:, 1].max()) for p in parts.values()) + 1
    csr = {s: CSR.from_pairs(p[:, 0], p[:, 1], n_users, n_items) for s, p in parts.items()}
    return InteractionData(folder.name, csr["train"], csr["valid"], csr["test"])


def test_ml1m_metric_time_and_agreement_with_slow_loop():
    folder = DIFFREC_DATA / "ml-1m_clean"
    if not (folder / "train_list.npy").exists():
        pytest.skip(f"DiffRec data not found at {folder}")
    data = _load_npy_split(folder)
    rng = np.random.default_rng(0)
    popularity = np.bincount(data.train.indices, minlength=data.n_items).astype(np.float32)
    scores = np.log1p(popularity)[None, :] + 0.5 * rng.standard_normal(
        (data.n_users, data.n_items)).astype(np.float32)
    ks = (10, 20, 50, 100)
    items, _ = topk_excluding(torch.from_numpy(scores), [data.train, data.valid], 100)
    t0 = time.perf_counter()
    out = evaluate_topk(items, data, "test", ks=ks)
    metric_seconds = time.perf_counter() - t0
    assert metric_seconds < 2.0, metric_seconds
    assert out["n_users"] == data.n_users
    # the popularity ranking is far better than chance
    assert out["recall@20"] > 20 / data.n_items
    # spot-check 300 users against the slow loop
    sub = np.arange(0, data.n_users, data.n_users // 300)[:300]
    sub_data = InteractionData("sub", data.train.take_rows(sub), data.valid.take_rows(sub),
                               data.test.take_rows(sub))
    fast = evaluate(FixedScores(scores[sub]), sub_data, "test", ks=ks)
    slow = _slow_evaluate(scores[sub], sub_data, "test", ks, "reference")
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_evaluation_equals_cpu():
    data, scores = _random_data(seed=7)
    cpu = evaluate(FixedScores(scores), data, "test")
    gpu = evaluate(FixedScores(scores).cuda(), data, "test")       # device from the model
    for key, value in cpu.items():
        assert gpu[key] == (pytest.approx(value, abs=1e-12)
                            if isinstance(value, float) else value), key


@pytest.mark.parametrize("chunk", [1, 7, 64, 150, 4096])
def test_running_topk_over_chunks_equals_one_topk_of_the_masked_matrix(chunk):
    # distinct scores (a permutation), so the exact top-k is unique
    data, _ = _random_data(seed=7)
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(rng.permutation(data.n_users * data.n_items).reshape(
        data.n_users, data.n_items).astype(np.float32))
    masked = [data.train, data.valid]
    dense = scores.clone()
    for m in masked:
        rows = np.repeat(np.arange(m.n_rows), m.row_lengths())
        dense[torch.from_numpy(rows), torch.from_numpy(m.indices)] = -torch.inf
    ref_values, ref_items = torch.topk(dense, 50, dim=1)
    items, values = topk_excluding(scores, masked, 50, chunk=chunk)
    assert torch.equal(items, ref_items) and torch.equal(values, ref_values)


def test_heads_in_any_item_order_rank_like_the_score_matrix():
    """A model with linear heads over shuffled item subsets (as L-DiffRec's per-cluster
    decoders) is ranked by the chunked head path exactly as by its full score matrix."""
    from scale_diffrec.models.base import ItemHead

    class TwoHeads(Recommender):
        def __init__(self, n_items):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(n_items, generator=g)
            self.parts = [order[: n_items // 3], order[n_items // 3:]]
            self.weights = [torch.randn(len(p), 4, generator=g) for p in self.parts]
            self.biases = [torch.randn(len(p), generator=g) for p in self.parts]
            self.n_items = n_items

        def query(self, batch):
            x = batch.dense()
            return {f"h{h}": x[:, :4] * (h + 1) + x.sum(1, keepdim=True) for h in range(2)}

        def item_heads(self):
            return [ItemHead(f"h{h}", self.parts[h], self.weights[h], self.biases[h])
                    for h in range(2)]

        def score(self, batch):
            out = torch.empty(batch.batch_size, self.n_items)
            q = self.query(batch)
            for h in self.item_heads():
                out[:, h.items] = q[h.name] @ h.weight.T + h.bias
            return out

    data, _ = _random_data(seed=8)
    model = TwoHeads(data.n_items)
    scores = model.score(data.train.to_torch())

    class Plain(FixedScores):
        pass
    for split in ("valid", "test"):
        for chunk_mib in (3e-4, None):           # 4 items at a time, or every item at once
            got = evaluate(model, data, split, batch_size=17, chunk_mib=chunk_mib)
            ref = evaluate(Plain(scores), data, split)
            for key, value in ref.items():
                assert got[key] == (pytest.approx(value, abs=1e-12)
                                    if isinstance(value, float) else value), key
