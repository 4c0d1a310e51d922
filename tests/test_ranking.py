"""ranking.py: the running top-k over chunks equals one dense top-k; linear heads' blocks."""
import numpy as np
import torch

from scale_diffrec.data.csr import CSR
from scale_diffrec.ranking import MIN_TAKE, RunningTopK, linear_chunks, seen_positions


def dense_topk(scores: torch.Tensor, seen: CSR, k: int):
    masked = scores.clone()
    masked[torch.from_numpy(seen.row_ids()), torch.from_numpy(seen.indices)] = -torch.inf
    values, items = torch.topk(masked, k, dim=1)
    return torch.where(values > -torch.inf, items, -1), values


def test_running_topk_grows_its_take_when_a_late_chunk_beats_every_kept_score():
    gen = torch.Generator().manual_seed(0)
    b, n, k, chunk = 6, 400, 20, 50
    # falling scores: after the first chunk a chunk adds nothing (the take drops to
    # MIN_TAKE); then items 300..349 beat everything, so the take must double to k
    scores = torch.linspace(10, 0, n).repeat(b, 1) + 0.01 * torch.rand(b, n, generator=gen)
    scores[:, 300:350] += 20
    rows = [0] * 10 + [1] * (n - 3)            # row 1 has only 3 unseen items: padding
    cols = list(range(295, 305)) + [i for i in range(n) if i not in (5, 150, 399)]
    seen = CSR.from_pairs(rows, cols, b, n)
    top = RunningTopK(b, k, seen_positions(seen, b))
    takes = []
    for s in range(0, n, chunk):
        top.add(scores[:, s:s + chunk].clone(), torch.arange(s, min(s + chunk, n)))
        takes.append(top.take)
    assert MIN_TAKE in takes[1:6] and takes[6] == 2 * k         # chunk 300..349 took k
    items, values = top.result()
    want_items, want_values = dense_topk(scores, seen, k)
    assert torch.equal(values, want_values) and torch.equal(items, want_items)
    assert items[1, :3].tolist() == [5, 150, 399] and (items[1, 3:] == -1).all()


def test_running_topk_random_chunks_and_positions_equal_dense_topk():
    rng = np.random.default_rng(1)
    b, n, k = 9, 1000, 37
    scores = torch.from_numpy(rng.standard_normal((b, n)).astype(np.float32))
    seen = CSR.from_pairs(rng.integers(0, b, 3000), rng.integers(0, n, 3000), b, n)
    top = RunningTopK(b, k, seen_positions(seen, b))
    edges = np.unique(np.concatenate([[0, n], rng.integers(1, n, 25)]))
    for s, e in zip(edges[:-1], edges[1:]):      # chunks of 1 .. hundreds of items
        top.add(scores[:, s:e].clone(), torch.arange(s, e))
    items, values = top.result()
    want_items, want_values = dense_topk(scores, seen, k)
    assert torch.equal(values, want_values) and torch.equal(items, want_items)


def test_linear_chunks_are_the_heads_products_block_by_block():
    gen = torch.Generator().manual_seed(2)
    q, w, b = (torch.randn(7, 5, generator=gen), torch.randn(23, 5, generator=gen),
               torch.randn(23, generator=gen))
    items = torch.arange(100, 123)
    want = torch.addmm(b, q, w.T)
    blocks = [(s.clone(), i) for s, i in linear_chunks(q, w, b, items, 10)]
    assert [s.shape[1] for s, _ in blocks] == [10, 10, 3]
    torch.testing.assert_close(torch.cat([s for s, _ in blocks], 1), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.cat([i for _, i in blocks]), items)
    with torch.autocast("cpu", dtype=torch.bfloat16):       # autocast: its own dtype
        low = [s for s, _ in linear_chunks(q, w, b, items, 10)]
    assert low[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(low, 1).float(), want, atol=0.1, rtol=0.02)
