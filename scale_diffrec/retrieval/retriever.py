"""Serve top-K recommendations from an exported bundle (no Ray, no training loop, no data).

    retriever = Retriever.load("runs/quickstart/index")
    items, scores = retriever.recommend([[12, 40, 7], [3]], k=20)    # original item ids

A history is a list of the user's items in their original ids, oldest first (the order
matters only for T-/LT-DiffRec, whose input weights grow linearly with recency). The query
tower (the model rebuilt from the bundle's config and weights) turns the histories into one
query per head; FAISS searches each unit for ``k`` plus the most seen items any user of the
batch has in that unit, so after dropping seen items at least ``k`` candidates remain per
unit, and the merged top-``k`` is exact for flat indexes (``index.search_units``).
``brute_force=True`` ranks the model's full output instead, for checking.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch

from ..config import load_config
from ..data.csr import CSR
from ..data.errors import DataError
from ..data.time_weights import time_weights
from ..device import model_device, resolve_device
from ..models import build_model
from .bundle import CONFIG, ITEM_IDS, PARTITION, TOWER, read_manifest
from .index import SearchUnit, gpu_available, query_vectors, search_units, to_gpu


class Retriever:
    def __init__(self, folder: Path, manifest: dict, cfg: dict, model, item_ids: np.ndarray,
                 units: list[SearchUnit]):
        self.folder, self.manifest, self.cfg, self.model = folder, manifest, cfg, model
        self.item_ids, self.units = item_ids, units
        self.n_items = len(item_ids)
        self.head_dims = {h["name"]: h["units"][0]["dim"] for h in manifest["heads"]}
        self.unit_of = np.empty(self.n_items, np.int64)
        for u, unit in enumerate(units):
            self.unit_of[unit.items] = u
        self._index_of = np.argsort(item_ids, kind="stable")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path, use_gpu="auto", verify: bool = True,
             device: str = "auto") -> "Retriever":
        """Open a bundle: manifest and checksums, query tower (on ``device``: auto = CUDA
        when torch sees a GPU, see ``device.resolve_device``), FAISS units (on the GPU when
        faiss has one and ``use_gpu`` allows)."""
        folder = Path(folder)
        manifest = read_manifest(folder, verify)
        n_items = int(manifest["n_items"])
        cfg = load_config(folder / CONFIG)
        item_ids = np.load(folder / ITEM_IDS)
        if len(item_ids) != n_items:
            raise DataError(folder / ITEM_IDS, f"{len(item_ids)} item ids but the manifest "
                                               f"says {n_items} items")
        partition = None
        if cfg["model"] == "ldiffrec":
            from ..partition import Partition
            partition = Partition.load(folder / PARTITION, n_items=n_items)
        model = build_model(cfg, n_items, partition)
        model.load_state_dict(torch.load(folder / TOWER, map_location="cpu", weights_only=True))
        model.to(resolve_device(device)).eval()
        gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        units = [cls._load_unit(folder, head, unit, gpu)
                 for head in manifest["heads"] for unit in head["units"]]
        covered = sum(len(u.items) for u in units)
        if covered != n_items:
            raise DataError(folder / "manifest.json", f"the units hold {covered} items but "
                                                      f"the bundle has {n_items}")
        return cls(folder, manifest, cfg, model, item_ids, units)

    @staticmethod
    def _load_unit(folder: Path, head: dict, unit: dict, gpu: bool) -> SearchUnit:
        path = folder / "units" / f"{unit['name']}.faiss"
        index = faiss.read_index(str(path))
        items = np.load(folder / "units" / f"{unit['name']}.items.npy")
        if index.d != unit["dim"] or index.ntotal != unit["n_items"] or len(items) != index.ntotal:
            raise DataError(path, f"index holds {index.ntotal} vectors of dimension {index.d}, "
                                  f"the manifest says {unit['n_items']} of {unit['dim']}")
        return SearchUnit(head["name"], index, items, unit["kind"], dict(unit["params"]),
                          to_gpu(index, unit["kind"]) if gpu else None)

    # ------------------------------------------------------------------ ids
    def to_indexes(self, ids: Sequence) -> np.ndarray:
        """Original item ids -> item indexes; an unknown id is a DataError naming it."""
        ids = np.asarray(ids, dtype=self.item_ids.dtype)
        pos = np.searchsorted(self.item_ids, ids, sorter=self._index_of)
        pos = np.minimum(pos, self.n_items - 1)
        found = self._index_of[pos]
        bad = self.item_ids[found] != ids
        if bad.any():
            raise DataError(self.folder / ITEM_IDS, f"unknown item id {ids[bad][0].item()} "
                                                    f"(not in the exported catalogue)")
        return found

    def histories_csr(self, histories: Sequence[Sequence]) -> CSR:
        """[B, I] rows of the histories (original ids, oldest first); values 1, or the
        T-DiffRec recency weights when the model was trained with them."""
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols = (self.to_indexes(np.concatenate([np.asarray(h) for h in histories]))
                if len(rows) else np.zeros(0, np.int64))
        values = np.ones(len(rows), np.float32)
        tw = self.cfg["data"]["time_weights"]
        if tw:
            indptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
            order = np.concatenate([np.arange(len(h)) for h in histories]) if len(rows) else rows
            values = time_weights(indptr, order, float(tw["w_min"]), float(tw["w_max"]))
        return CSR.from_pairs(rows, cols, len(histories), self.n_items, values)

    # ------------------------------------------------------------------ serving
    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        for unit in self.units:
            unit.set_search(nprobe, ef_search)

    @torch.no_grad()
    def recommend_indexes(self, rows: CSR, k: int, exclude_seen: bool = True,
                          brute_force: bool = False, exclude: CSR | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indexes [B, k] (-1 = none) and scores [B, k] for CSR rows [B, I].

        Excluded: the rows' own items (``exclude_seen``), or the items of ``exclude`` [B, I]
        when given (e.g. train + valid items when ranking for the test split).
        """
        batch = rows.to_torch(model_device(self.model))
        seen = exclude if exclude is not None else (rows if exclude_seen else None)
        if brute_force:
            scores = self.model.score(batch).float().cpu()
            if seen is not None:
                r = np.repeat(np.arange(seen.n_rows), seen.row_lengths())
                scores[torch.from_numpy(r), torch.from_numpy(seen.indices)] = -torch.inf
            top, items = torch.topk(scores, min(k, self.n_items), dim=1)
            items = torch.where(torch.isfinite(top), items, -1)
            return items.numpy(), top.numpy()
        queries = {name: query_vectors(q.cpu().float().numpy(), self.head_dims[name])
                   for name, q in self.model.query(batch).items()}
        return search_units(self.units, queries, k, seen, self.unit_of)

    def recommend(self, histories: Sequence[Sequence], k: int = 20, exclude_seen: bool = True,
                  brute_force: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k original item ids [B, k] and scores [B, k] for histories of original ids;
        slots beyond the catalogue's unseen items hold id -1 and score -inf."""
        idx, scores = self.recommend_indexes(self.histories_csr(histories), k, exclude_seen,
                                             brute_force)
        ids = np.where(idx >= 0, self.item_ids[np.maximum(idx, 0)], -1)
        return ids, scores
