"""A large declared catalogue loads through load_data as sparse rows, cold items kept."""
import numpy as np
import pyarrow.parquet as pq

from scale_diffrec.config import load_config
from scale_diffrec.data import CSR, load_data, write_synthetic_parquet


def test_large_catalogue_parquet_loads_sparse_with_cold_items(tmp_path):
    path = tmp_path / "big.parquet"
    info = write_synthetic_parquet(path, n_users=300, n_items=200_000, n_clusters=16,
                                   rows_per_group=2000)
    cfg = load_config(None, ["data.source=parquet", f"data.path={path}",
                             "data.n_items=200000"])
    d = load_data(cfg)

    assert d.n_items == 200_000 and d.item_ids is None      # ids kept, cold items included
    assert d.n_users == 300
    table = pq.read_table(path, columns=["user_id", "item_id"])
    pairs = (table.column("user_id").to_numpy() * 200_000
             + table.column("item_id").to_numpy())
    assert len(pairs) == info["rows"]
    duplicates = info["rows"] - len(np.unique(pairs))
    assert d.meta["duplicates"] == duplicates
    mats = (d.train, d.valid, d.test)
    assert sum(m.nnz for m in mats) == info["rows"] - duplicates
    for m in mats:                              # sparse rows, never a dense users x items
        assert isinstance(m, CSR) and m.shape == (300, 200_000)
        assert m.indptr.shape == (301,) and m.indices.shape == m.values.shape == (m.nnz,)
        assert m.indices.max() < 200_000
    assert len(np.unique(d.train.indices)) < 200_000               # most items are cold
