"""Baselines fitted once on the train matrix X [U, I] (values: interaction weights, 1 for
implicit feedback): most-popular, ItemKNN, EASE and ALS (the ``implicit`` library).

    most-popular  score_ui = pop_i = sum_u X_ui                                  (linear head)
    ItemKNN       score_uj = sum_i X_ui W_ij, W_ij = sim_ij if i is one of the k most
                  similar items of j (i != j), else 0;
                  sim_ij = (X_:i . X_:j) / (|X_:i| |X_:j| + shrink)
                  (item-based top-k CF, Sarwar et al., WWW 2001; the shrunk cosine and the
                  per-item top-k as in RecBole's ItemKNN, ``ComputeSimilarity``)
    EASE          score_u = X_u B, B = I - P diagMat(1 / diag(P)), P = (X^T X + lamda I)^-1
                  (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019, eq. 8: B_ij =
                  -P_ij / P_jj off the diagonal, 0 on it); refused above ``ease.max_items``
    ALS           score_ui = x_u . y_i; item factors y fitted by ``implicit``'s ALS (Hu,
                  Koren, Volinsky, ICDM 2008; confidence alpha X_ui as ``implicit`` defines
                  it); a history's x_u is ``implicit``'s ``recalculate_user`` (the user
                  least-squares step against the item factors)                (linear head)

Most-popular and ALS are linear heads, so they export to FAISS bundles like the neural
models (most-popular's query is empty: item vector [pop_i], query [1]). ItemKNN and EASE
score a history through an I x I item matrix: their scores are not an inner product of a
short query with item vectors, so they are evaluated but not exported (export refuses them
in one line).
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.csr import CSR, SparseRows
from ..errors import ConfigError
from ..schema import Config
from .base import FittedRecommender, ItemHead


def torch_csr(csr: CSR) -> torch.Tensor:
    """A torch sparse CSR tensor of ``csr`` (shares the index arrays)."""
    return torch.sparse_csr_tensor(torch.from_numpy(csr.indptr), torch.from_numpy(csr.indices),
                                   torch.from_numpy(csr.values), csr.shape)


def rows_csr(batch: SparseRows) -> torch.Tensor:
    """A torch sparse CSR tensor [B, I] of a batch of rows."""
    return torch.sparse_csr_tensor(batch.indptr, batch.indices, batch.values,
                                   (batch.batch_size, batch.n_cols))


class MostPopular(FittedRecommender):
    """Every user gets the items ranked by their train interaction count (weight sum)."""

    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.register_buffer("popularity", torch.zeros(n_items))

    def fit(self, train: CSR) -> None:
        self.popularity = torch.from_numpy(np.bincount(
            train.indices, weights=train.values, minlength=self.n_items).astype(np.float32))

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return self.popularity.expand(batch.batch_size, -1).clone()

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        return {"items": torch.zeros(batch.batch_size, 0, device=self.popularity.device)}

    def item_heads(self) -> list[ItemHead]:
        p = self.popularity
        return [ItemHead("items", torch.arange(self.n_items, device=p.device),
                         p.new_zeros(self.n_items, 0), p)]


class ItemKNN(FittedRecommender):
    """Item-based top-k CF with a shrunk cosine (module docstring). ``W`` is held sparse,
    as CSR rows i -> (j, W_ij): ``neighbour_indptr`` [I + 1], ``neighbour_items`` [nnz],
    ``neighbour_weights`` [nnz], nnz <= k I."""

    def __init__(self, n_items: int, k: int, shrink: float, block_pairs: int = 1 << 23):
        super().__init__()
        self.n_items, self.k, self.shrink, self.block_pairs = n_items, k, shrink, block_pairs
        self.register_buffer("neighbour_indptr", torch.zeros(n_items + 1, dtype=torch.long))
        self.register_buffer("neighbour_items", torch.zeros(0, dtype=torch.long))
        self.register_buffer("neighbour_weights", torch.zeros(0))

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> "ItemKNN":
        return cls(n_items, cfg.itemknn.k, cfg.itemknn.shrink)  # ranges: schema.ItemKNNConfig

    def fit(self, train: CSR) -> None:
        """sim = X^T X / (norms outer + shrink), k best per item, computed for blocks of
        items whose co-occurrence lists hold about ``block_pairs`` entries (sparse
        products only; memory ~ 20 bytes x block_pairs)."""
        x = torch_csr(train)
        xt = train.transpose()
        norms = np.sqrt(np.bincount(train.indices, weights=train.values.astype(np.float64) ** 2,
                                    minlength=self.n_items))
        # co-occurrence entries of item i's row <= sum over its users of their row lengths
        pairs = np.bincount(train.indices, weights=np.repeat(train.row_lengths(),
                                                             train.row_lengths()),
                            minlength=self.n_items)
        cumulative = np.cumsum(pairs)
        targets, sources, weights = [], [], []
        start = 0
        while start < self.n_items:
            done = cumulative[start - 1] if start else 0.0
            end = max(start + 1, int(np.searchsorted(cumulative, done + self.block_pairs,
                                                     side="right")))
            j, i, s = self._block_neighbours(xt, x, norms, start, min(end, self.n_items))
            targets.append(j), sources.append(i), weights.append(s)
            start = end
        j, i, s = (np.concatenate(a) for a in (targets, sources, weights))
        w = CSR.from_pairs(i, j, self.n_items, self.n_items, s)     # rows: source items i
        self.neighbour_indptr = torch.from_numpy(w.indptr)
        self.neighbour_items = torch.from_numpy(w.indices)
        self.neighbour_weights = torch.from_numpy(w.values)

    def _block_neighbours(self, xt: CSR, x: torch.Tensor, norms: np.ndarray, start: int,
                          end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(targets j, sources i, sim_ij) of the k nearest items i of each j in [start, end)."""
        block = torch.sparse.mm(torch_csr(xt.take_rows(np.arange(start, end))), x)
        counts = np.diff(block.crow_indices().numpy())
        j = np.repeat(np.arange(start, end, dtype=np.int64), counts)
        i = block.col_indices().numpy().astype(np.int64)
        sim = block.values().numpy().astype(np.float64) / (norms[j] * norms[i] + self.shrink)
        keep = (i != j) & (sim > 0)
        j, i, sim = j[keep], i[keep], sim[keep]
        order = np.lexsort((-sim, j))                     # by target, best first
        j, i, sim = j[order], i[order], sim[order]
        first = np.searchsorted(j, j, side="left")
        keep = np.arange(len(j)) - first < self.k
        return j[keep], i[keep], sim[keep].astype(np.float32)

    def _similarity(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.neighbour_indptr, self.neighbour_items,
                                       self.neighbour_weights, (self.n_items, self.n_items))

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return torch.sparse.mm(rows_csr(batch), self._similarity()).to_dense()

    @torch.no_grad()
    def score_chunks(self, batch: SparseRows, chunk: int):
        """Dense [B, chunk] blocks of the sparse product X_b W (never [B, I] at once)."""
        product = torch.sparse.mm(rows_csr(batch), self._similarity())
        device = product.device
        rows = torch.repeat_interleave(torch.arange(batch.batch_size, device=device),
                                       torch.diff(product.crow_indices()))
        cols, values = product.col_indices(), product.values()
        items = torch.arange(self.n_items, device=device)
        for s in range(0, self.n_items, chunk):
            n = min(chunk, self.n_items - s)
            inside = (cols >= s) & (cols < s + n)
            block = torch.zeros(batch.batch_size, n, device=device)
            block[rows[inside], cols[inside] - s] = values[inside]
            yield block, items[s:s + n]


class EASE(FittedRecommender):
    """EASE^R (module docstring): a dense [I, I] item matrix, so ``ease.max_items`` caps
    the catalogue (8 I^2 bytes for the float64 inverse, 4 I^2 for B)."""

    def __init__(self, n_items: int, lamda: float):
        super().__init__()
        self.n_items, self.lamda = n_items, lamda
        self.register_buffer("weights", torch.zeros(0, 0))

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> "EASE":
        max_items = cfg.ease.max_items                     # ranges: schema.EASEConfig
        if n_items > max_items:
            raise ConfigError(
                f"config key 'ease.max_items': the catalogue has {n_items:,} items, more than "
                f"{max_items:,}; EASE inverts a dense {n_items:,} x {n_items:,} matrix "
                f"({8 * n_items ** 2 / 2 ** 30:.3g} GiB in float64): raise ease.max_items "
                f"if that fits, or use itemknn")
        return cls(n_items, cfg.ease.lamda)

    def fit(self, train: CSR) -> None:
        x = torch_csr(train).to(torch.float64)
        gram = torch.sparse.mm(x.t().to_sparse_csr(), x).to_dense()
        gram.diagonal().add_(self.lamda)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        self.weights = b.float()

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return torch.sparse.mm(rows_csr(batch), self.weights)


class ALS(FittedRecommender):
    """Implicit-feedback matrix factorisation by ``implicit``'s alternating least squares
    (its GPU backend when ``als.use_gpu`` allows and it has CUDA). Buffer
    ``item_factors`` [I, factors]; queries solve each history's user factors."""

    def __init__(self, n_items: int, factors: int, regularization: float, iterations: int,
                 alpha: float, use_gpu="auto", seed: int = 0):
        super().__init__()
        self.n_items, self.factors = n_items, factors
        self.regularization, self.iterations, self.alpha = regularization, iterations, alpha
        self.use_gpu, self.seed = use_gpu, seed
        self.register_buffer("item_factors", torch.zeros(n_items, factors))
        self._solver = None

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> "ALS":
        a = cfg.als                                        # ranges: schema.ALSConfig
        return cls(n_items, a.factors, a.regularization, a.iterations, a.alpha, a.use_gpu,
                   cfg.seed)

    def _implicit(self, use_gpu: bool):
        """An unfitted ``implicit`` ALS of our settings (made with numpy's BLAS at one
        thread, as ``implicit`` advises: it parallelises itself)."""
        from implicit.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, "blas"):
            return AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=self.alpha,
                iterations=self.iterations, random_state=self.seed, use_gpu=use_gpu)

    def fit(self, train: CSR) -> None:
        import implicit.gpu
        from threadpoolctl import threadpool_limits
        use_gpu = implicit.gpu.HAS_CUDA if self.use_gpu == "auto" else bool(self.use_gpu)
        model = self._implicit(use_gpu)
        with threadpool_limits(1, "blas"):
            model.fit(_scipy_csr(train), show_progress=False)
        if use_gpu:
            model = model.to_cpu()
        self.item_factors = torch.from_numpy(np.ascontiguousarray(model.item_factors,
                                                                  dtype=np.float32))
        # the train users' factors [users, factors] (not saved; L-DiffRec's warm start)
        self.user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self._solver = None

    def _user_solver(self):
        """A CPU ``implicit`` model holding our item factors (for ``recalculate_user``)."""
        if self._solver is None:
            self._solver = self._implicit(False)
            self._solver.item_factors = self.item_factors.cpu().numpy()
        return self._solver

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._solver = None

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        rows = CSR(batch.indptr.cpu().numpy(), batch.indices.cpu().numpy(),
                   batch.values.cpu().numpy(), batch.n_cols)
        users = self._user_solver().recalculate_user(np.arange(rows.n_rows), _scipy_csr(rows))
        return {"items": torch.from_numpy(np.asarray(users, np.float32).reshape(
            rows.n_rows, self.factors)).to(batch.values.device)}

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return self.query(batch)["items"] @ self.item_factors.T

    def item_heads(self) -> list[ItemHead]:
        f = self.item_factors
        return [ItemHead("items", torch.arange(self.n_items, device=f.device), f,
                         f.new_zeros(self.n_items))]


def _scipy_csr(csr: CSR):
    """scipy.sparse.csr_matrix of ``csr`` (what ``implicit`` takes; scipy comes with it)."""
    from scipy.sparse import csr_matrix
    return csr_matrix((csr.values.astype(np.float32), csr.indices, csr.indptr), shape=csr.shape)


__all__ = ["MostPopular", "ItemKNN", "EASE", "ALS"]
