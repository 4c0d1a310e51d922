"""Item embeddings for L-DiffRec's k-means partition.

The reference (YiyanXu/DiffRec, L-DiffRec/main.py) clusters ``item_emb.npy``: 64-d LightGCN
item vectors shipped next to each dataset, one row per item index. We accept that file, a
parquet file of ``item_id`` + one list column of floats (mapped through ``data.item_ids``
when the loader remapped ids), or compute a built-in embedding from the train matrix: a
truncated SVD of the item x user matrix by a randomized range finder (Halko, Martinsson &
Tropp 2011, algorithm 4.4 with power iterations), using only sparse x dense products.

Config key ``ldiffrec.embeddings``:
    file  the file at config key ``data.item_emb``, else the array the data loader read
          (``InteractionData.item_emb``, e.g. the DiffRec authors' item_emb.npy); an error
          if neither
    svd   the built-in SVD embedding, ``ldiffrec.emb_dim`` dimensions, rows
          normalised to unit length (so that k-means groups by taste, not popularity)
    auto  file when one is available, else svd
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .choices import EmbeddingSource
from .config import typed
from .data.csr import CSR
from .errors import ConfigError, DataError
from .schema import Config



def check_embeddings(emb: np.ndarray, n_items: int, source) -> np.ndarray:
    """[n_items, d] finite float32, or a DataError naming ``source``."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise DataError(source, f"item embeddings must be a 2-d array [n_items, d], "
                                f"got shape {tuple(emb.shape)}")
    if emb.shape[0] != n_items:
        raise DataError(source, f"item embeddings have {emb.shape[0]} rows but the data has "
                                f"{n_items} items")
    if emb.shape[1] < 1:
        raise DataError(source, "item embeddings have 0 dimensions")
    if not np.issubdtype(emb.dtype, np.number):
        raise DataError(source, f"item embeddings must be numeric, got dtype {emb.dtype}")
    emb = emb.astype(np.float32, copy=False)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise DataError(source, "item embedding is not finite (NaN or inf)",
                        row=int(np.flatnonzero(bad)[0]))
    return emb


def load_item_embeddings(path: str | Path, n_items: int,
                         item_ids: np.ndarray | None = None) -> np.ndarray:
    """[n_items, d] float32 from ``.npy`` (row = item index) or parquet (item_id + vector).

    For parquet, ``item_ids`` [n_items] (the original id of each item index) maps the file's
    ``item_id`` column onto item indexes; without it the ids must be the indexes
    0..n_items-1. Every item needs exactly one row; rows for ids outside the data are
    ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "item embedding file not found")
    if path.suffix == ".npy":
        try:
            emb = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(path, f"not a readable .npy array: {err}") from None
        return check_embeddings(emb, n_items, path)
    if path.suffix in (".parquet", ".pq"):
        return _load_parquet(path, n_items, item_ids)
    raise DataError(path, "item embeddings must be a .npy or .parquet file")


def _load_parquet(path: Path, n_items: int, item_ids: np.ndarray | None) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, f"not a readable parquet file: {err}") from None
    if "item_id" not in table.column_names:
        raise DataError(path, "missing column", field="item_id")
    vec_cols = [f.name for f in table.schema if f.name != "item_id"
                and (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                     or pa.types.is_fixed_size_list(f.type))]
    if len(vec_cols) != 1:
        raise DataError(path, f"expected exactly one list column of floats besides "
                              f"'item_id', found {vec_cols or 'none'}")
    field = vec_cols[0]
    ids = table.column("item_id").to_numpy(zero_copy_only=False)
    col = table.column(field).combine_chunks()
    if col.null_count:
        raise DataError(path, "null vector", field=field,
                        row=int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]))
    lengths = np.asarray(col.value_lengths()) if hasattr(col, "value_lengths") else None
    if lengths is None:       # fixed-size list
        dim = col.type.list_size
        lengths = np.full(len(col), dim)
    dim = int(lengths[0]) if len(lengths) else 0
    if (lengths != dim).any():
        raise DataError(path, f"vectors differ in length (row 0 has {dim})", field=field,
                        row=int(np.flatnonzero(lengths != dim)[0]))
    values = col.flatten().to_numpy(zero_copy_only=False)
    try:
        vectors = np.asarray(values, dtype=np.float32).reshape(len(ids), dim)
    except (ValueError, TypeError) as err:
        raise DataError(path, f"vectors must be lists of numbers: {err}", field=field) from None

    if item_ids is None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(path, f"item ids must be the item indexes 0..{n_items - 1} "
                                  f"(the data has no id map), got dtype {ids.dtype}",
                            field="item_id")
        index = ids.astype(np.int64)
        keep = (index >= 0) & (index < n_items)
    else:
        item_ids = np.asarray(item_ids)
        order = np.argsort(item_ids, kind="stable")
        sorted_ids = item_ids[order]
        try:
            pos = np.searchsorted(sorted_ids, ids)
        except TypeError:
            raise DataError(path, f"item ids of dtype {ids.dtype} cannot be matched with the "
                                  f"data's ids ({item_ids.dtype})", field="item_id") from None
        pos = np.minimum(pos, len(sorted_ids) - 1)
        keep = sorted_ids[pos] == ids
        index = np.where(keep, order[pos], -1)
    index, vectors, rows = index[keep], vectors[keep], np.flatnonzero(keep)
    counts = np.bincount(index, minlength=n_items)
    if (counts > 1).any():
        item = int(np.flatnonzero(counts > 1)[0])
        dup_rows = rows[index == item]
        raise DataError(path, f"item has {counts[item]} embedding rows "
                              f"(id {ids[dup_rows[0]]!r})", field="item_id", row=int(dup_rows[1]))
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        name = item_ids[missing[0]] if item_ids is not None else missing[0]
        raise DataError(path, f"{len(missing)} of {n_items} items have no embedding "
                              f"(e.g. item id {name!r})", field="item_id")
    out = np.empty((n_items, dim), np.float32)
    out[index] = vectors
    return check_embeddings(out, n_items, path)


def _torch_csr(m: CSR) -> torch.Tensor:
    with warnings.catch_warnings():      # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr), torch.from_numpy(m.indices),
            torch.from_numpy(m.values.astype(np.float64)), size=m.shape,
            check_invariants=False)


def svd_item_embeddings(train: CSR, dim: int, seed: int = 0, n_power_iter: int = 4,
                        oversample: int = 10) -> np.ndarray:
    """[n_items, dim] item coordinates U_k S_k of the item x user matrix A = U S V^T.

    Randomized range finder: Y = A Omega, then ``n_power_iter`` rounds of
    Q <- qr(A (A^T Q)), B = Q^T A (k+p x users, small), svd(B) = Ub S Vt, U = Q Ub.
    Only sparse x dense products ([items, k+p] and [users, k+p] dense blocks); never a dense
    users x items matrix. Deterministic for a seed (float64 throughout, sign-fixed columns).
    """
    n_users, n_items = train.shape
    if dim < 1:
        raise ConfigError(f"config key 'ldiffrec.emb_dim' must be >= 1, got {dim}")
    rank = min(dim, n_items, n_users)
    k = min(rank + oversample, n_items, n_users)
    a_t = _torch_csr(train)                                # [users, items] = A^T
    a = _torch_csr(train.transpose())                      # [items, users] = A
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(n_users, k, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(a @ omega)                      # [items, k]
    for _ in range(n_power_iter):
        z, _ = torch.linalg.qr(a_t @ q)                    # [users, k]
        q, _ = torch.linalg.qr(a @ z)                      # [items, k]
    b_t = a_t @ q                                          # [users, k] = (Q^T A)^T
    # thin svd of the small B = Q^T A [k, users]
    ub, s, _ = torch.linalg.svd(b_t.T, full_matrices=False)
    u = q @ ub[:, :rank]
    emb = u * s[:rank]
    # fix each column's sign (largest-magnitude entry positive) for reproducibility
    pivot = emb.abs().argmax(dim=0)
    signs = torch.sign(emb[pivot, torch.arange(rank)])
    signs[signs == 0] = 1
    emb = emb * signs
    out = np.zeros((n_items, dim), np.float32)
    out[:, :rank] = emb.numpy().astype(np.float32)
    return out


def item_embeddings(cfg: Config | dict, data) -> tuple[np.ndarray, str]:
    """(embeddings [n_items, d] float32, a short description of where they came from)."""
    cfg = typed(cfg)
    kind, dim, path = cfg.ldiffrec.embeddings, cfg.ldiffrec.emb_dim, cfg.data.item_emb
    if kind in (EmbeddingSource.file, EmbeddingSource.auto):
        if path:
            return load_item_embeddings(path, data.n_items, data.item_ids), str(path)
        if getattr(data, "item_emb", None) is not None:
            return check_embeddings(data.item_emb, data.n_items, f"{data.name} item_emb"), \
                f"{data.name} item_emb"
        if kind == EmbeddingSource.file:
            raise ConfigError("config key 'ldiffrec.embeddings' is 'file' but there are no "
                              "item embeddings: set 'data.item_emb' to a .npy or parquet "
                              "file, or use ldiffrec.embeddings=svd")
    emb = svd_item_embeddings(data.train, dim, seed=cfg.seed)
    # rows scaled to unit length: an item's SVD norm mostly measures its popularity, which
    # would make k-means cut by popularity (one huge cluster of the long tail) rather than
    # by taste; items without train interactions stay at the origin
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)
    return emb, f"row-normalised svd({dim}) of the train matrix"


def als_factors(train: CSR, dim: int, regularization: float, alpha: float,
                iterations: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(item factors Y [n_items, dim], user factors X [n_users, dim]) float32 of
    implicit-feedback alternating least squares on ``train`` [users, items] (Hu, Koren &
    Volinsky, ICDM 2008): the ``als`` baseline's fit (``models.baselines.ALS``, the
    ``implicit`` library), on the CPU so that it is deterministic for a seed.
    """
    try:
        import implicit  # noqa: F401
    except ImportError:
        raise ConfigError("config key 'ldiffrec.warm_start' is 'als' but the package "
                          "'implicit' is not installed (pip install implicit)") from None
    from .models.baselines import ALS   # cycle: models (ldiffrec's clusters) import this module
    als = ALS(train.n_cols, int(dim), float(regularization), int(iterations), float(alpha),
              use_gpu=False, seed=int(seed))
    als.fit(train)
    return als.item_factors.numpy()[:, :dim], als.user_factors[:, :dim]


def als_warm_start(train: CSR, dim: int, regularization: float, alpha: float,
                   iterations: int, seed: int = 0, gain_users: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(encoder [n_items, dim], decoder [n_items, dim]) float32: a one-layer tanh encoder
    and a linear decoder that, before any training, rank as ALS does on ``train``.

    Pre-training the item tables by matrix factorisation and fine-tuning the network from
    there is NCF's recipe (He et al., "Neural Collaborative Filtering", WWW 2017, section
    3.4.1); the factorisation here is ``als_factors`` (item factors Y, user factors X):

      * encoder a * s * Y (Y^T Y + reg I)^-1: the fold-in of a history x onto the item
        factors (the ALS user update without the confidence weights; measured on Epinions
        it ranks as well as X itself), s the least-squares scalar that matches x -> X on
        the train users, a = 0.5 / rms(X) so that tanh's input has root mean square 0.5
        (near its linear range);
      * decoder g * Y / a, so logits ~ g * X Y^T; g is the logit gain among 2^-4 .. 2^12
        that minimises the multinomial loss (softmax over the items) of up to
        ``gain_users`` train users: item factors fitted to 0/1 targets give scores in
        [0, 1], far too flat for a softmax over a large catalogue.
    """
    item_f, user_f = als_factors(train, dim, regularization, alpha, iterations, seed)
    y, x = torch.from_numpy(item_f).double(), torch.from_numpy(user_f).double()
    fold = y @ torch.linalg.inv(y.T @ y + float(regularization) * torch.eye(dim,
                                                                           dtype=y.dtype))
    folded = _torch_csr(train) @ fold                                 # [users, dim]
    s = float((folded * x).sum() / folded.pow(2).sum().clamp_min(1e-30))
    a = 0.5 / float(x.pow(2).mean().sqrt().clamp_min(1e-30))
    gain = _logit_gain(train, x, y, gain_users)
    return (a * s * fold).float().numpy(), (gain * y / a).float().numpy()


def _logit_gain(train: CSR, user_f: torch.Tensor, item_f: torch.Tensor,
                n_users: int) -> float:
    """The g in 2^-4 .. 2^12 minimising mean_u [n_u logsumexp_i(g s_ui) - g sum_{i in u} s_ui]
    with s = user_f @ item_f.T, over the first ``n_users`` users that have items."""
    users = np.flatnonzero(train.row_lengths() > 0)[:n_users]
    rows = train.take_rows(users)
    scores = (user_f[torch.from_numpy(users)] @ item_f.T).float()        # [n, items]
    row_of = torch.from_numpy(rows.row_ids())
    values = torch.from_numpy(rows.values.astype(np.float32))
    picked = torch.zeros(len(users)).index_add_(
        0, row_of, values * scores[row_of, torch.from_numpy(rows.indices.astype(np.int64))])
    total = torch.zeros(len(users)).index_add_(0, row_of, values)
    gains = [2.0 ** k for k in range(-4, 13)]
    losses = [float((total * torch.logsumexp(g * scores, 1) - g * picked).mean())
              for g in gains]
    return gains[int(np.argmin(losses))]
