"""Serve top-K recommendations from an exported bundle (no Ray, no training loop, no data).

    retriever = Retriever.load("runs/quickstart/index")
    items, scores = retriever.recommend([[12, 40, 7], [3]], k=20)    # original item ids

A history is a list of the user's items in their original ids, oldest first (the order
matters for T-/LT-DiffRec, whose input weights grow linearly with recency, and for DiffuRec,
whose query tower reads the sequence: its last ``diffurec.max_len`` items, repeats kept,
through the reverse chain, with noise from the model's (seed, 0) stream, so a history
gets the same recommendations every time within the same batch). The query
tower (the model rebuilt from the bundle's config and weights) turns the histories into one
query per head; FAISS searches each unit for ``k`` plus the most seen items any user of the
batch has in that unit, so after dropping seen items at least ``k`` candidates remain per
unit, and the merged top-``k`` is exact for flat indexes (``index.search_units``).
``brute_force=True`` ranks the model's full output instead, for checking, by the
evaluator's ranking (``evaluate.topk_excluding``: ``ranking.RunningTopK``). With seen items
kept (``exclude_seen=False``) a model whose held items score off its heads (``seen_scale``:
DiffRec predicting the noise) has them scored exactly here and merged.

Ids are the bundle's kind, integers or strings (``item_ids.parquet``); an id of the other
kind or not in the catalogue is a DataError naming where it came from (a histories file
and its row, ``--items`` and its position). ``load`` resolves the bundle's current version
once and reads only its files (``bundle``), so it never mixes two exports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import load_config
from ..data.csr import CSR
from ..data.sequences import Sequences
from ..data.time_weights import time_weights
from ..device import model_device, resolve_device
from ..errors import ConfigError, DataError
from ..evaluate import topk_excluding
from ..models import build_model
from ..partition import Partition
from ..ranking import with_bias
from ..runs import first_line, load_model_state
from .bundle import (CONFIG, ITEM_IDS, MANIFEST, PARTITION, TOWER, read_item_ids, read_manifest,
                     resolve)
from .index import (SearchUnit, faiss, gpu_available, merge_topk, query_vectors,
                    search_units, to_gpu)
from .params import SEARCH_PARAMS, check_setting, option

RETRIES = 3      # re-resolutions when exports remove the version a load had resolved


class Retriever:
    def __init__(self, folder: Path, manifest: dict, cfg: dict, model, item_ids: np.ndarray,
                 units: list[SearchUnit]):
        self.folder, self.manifest, self.cfg, self.model = folder, manifest, cfg, model
        self.item_ids, self.units = item_ids, units
        self.n_items = len(item_ids)
        self.id_kind = "str" if item_ids.dtype == object else "int"
        self.head_dims = {h["name"]: h["units"][0]["dim"] for h in manifest["heads"]}
        self.unit_of = np.empty(self.n_items, np.int64)
        for u, unit in enumerate(units):
            self.unit_of[unit.items] = u
        self._index_of = np.argsort(item_ids, kind="stable")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path, use_gpu="auto", verify: bool = True,
             device: str = "auto") -> "Retriever":
        """Open the bundle's current version (``bundle.resolve``, read once): manifest and
        checksums, query tower (on ``device``: auto = CUDA when torch sees a GPU, see
        ``device.resolve_device``), FAISS units (on the GPU when faiss has one and
        ``use_gpu`` allows). Every file comes from that one version; if newer exports
        remove it while it is being read, the load starts again from the then current one."""
        folder = Path(folder)
        for attempt in range(RETRIES + 1):
            version = resolve(folder)
            try:
                return cls._load_version(version, use_gpu, verify, device)
            except (DataError, FileNotFoundError):
                if version.is_dir() or attempt == RETRIES:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load_version(cls, folder: Path, use_gpu, verify: bool, device: str) -> "Retriever":
        manifest = read_manifest(folder, verify)
        n_items = int(manifest["n_items"])
        cfg = load_config(folder / CONFIG)
        item_ids = read_item_ids(folder)
        if len(item_ids) != n_items:
            raise DataError(folder / ITEM_IDS, f"{len(item_ids)} item ids but the manifest "
                                               f"says {n_items} items")
        partition = None
        if cfg["model"] in ("ldiffrec", "diffurec"):
            partition = Partition.load(folder / PARTITION, n_items=n_items)
        model = build_model(cfg, n_items, partition)
        load_model_state(model, torch.load(folder / TOWER, map_location="cpu",
                                           weights_only=True), folder / TOWER)
        model.to(resolve_device(device)).eval()
        gpu = gpu_available() if use_gpu == "auto" else bool(use_gpu)
        units = [cls._load_unit(folder, head, unit, gpu)
                 for head in manifest["heads"] for unit in head["units"]]
        covered = sum(len(u.items) for u in units)
        if covered != n_items:
            raise DataError(folder / MANIFEST, f"the units hold {covered} items but the "
                                               f"bundle has {n_items}")
        return cls(folder, manifest, cfg, model, item_ids, units)

    @staticmethod
    def _load_unit(folder: Path, head: dict, unit: dict, gpu: bool) -> SearchUnit:
        path = folder / "units" / f"{unit['name']}.faiss"
        try:
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        except RuntimeError as err:         # unverified (verify=False) and damaged
            raise DataError(path, f"not a readable FAISS index ({first_line(err)})") from None
        items = np.load(folder / "units" / f"{unit['name']}.items.npy")
        if index.d != unit["dim"] or index.ntotal != unit["n_items"] or len(items) != index.ntotal:
            raise DataError(path, f"index holds {index.ntotal} vectors of dimension {index.d}, "
                                  f"the manifest says {unit['n_items']} of {unit['dim']}")
        return SearchUnit(head["name"], index, items, unit["kind"], dict(unit["params"]),
                          to_gpu(index, unit["kind"]) if gpu else None)

    # ------------------------------------------------------------------ ids
    def parse_ids(self, text: str) -> list:
        """'12,40,7' -> ids of this bundle's kind (int or str). String ids are taken as
        written (a space is part of an id); integer ids may have spaces around them.
        DataError for an empty list, an empty entry ('1,,2') or a non-integer where the
        bundle's ids are integers."""
        parts = text.split(",")
        for pos, part in enumerate(parts):
            if not part.strip():
                what = "no item ids" if len(parts) == 1 else "an empty item id"
                raise DataError("--items", f"{what} (give ID,ID,...)", row=pos)
        if self.id_kind == "str":
            return parts
        for pos, part in enumerate(parts):
            try:
                int(part)
            except ValueError:
                raise DataError("--items", f"item id {part!r} is not an integer (the "
                                           f"bundle's item ids are integers)",
                                row=pos) from None
        return [int(x) for x in parts]

    def lookup(self, ids: Sequence, source, rows: np.ndarray | None = None,
               field: str | None = None) -> np.ndarray:
        """Original item ids [n] -> item indexes [n]. An id of the wrong kind or not in the
        catalogue is a DataError naming ``source`` (a file, '--items', 'histories'),
        ``field`` and the row (``rows[j]`` for id j; j by default)."""
        where = lambda j: int(rows[j]) if rows is not None else j        # noqa: E731
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and self.id_kind == "int":
            values = ids.astype(np.int64)
        else:
            values = np.empty(len(ids), dtype=object)
            values[:] = list(ids)
            want = str if self.id_kind == "str" else (int, np.integer)
            for j, v in enumerate(values):
                if not isinstance(v, want) or isinstance(v, (bool, np.bool_)):
                    kind = "strings" if self.id_kind == "str" else "integers"
                    raise DataError(source, f"item id {v!r} is a {type(v).__name__}; the "
                                            f"bundle's item ids are {kind}", field=field,
                                    row=where(j))
            if self.id_kind == "int":
                values = values.astype(np.int64)
        if not len(values):
            return np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, values, sorter=self._index_of),
                         self.n_items - 1)
        found = self._index_of[pos]
        bad = np.flatnonzero(self.item_ids[found] != values)
        if len(bad):
            v = values[bad[0]]
            raise DataError(source, f"unknown item id {v.item() if isinstance(v, np.generic) else v!r} "
                                    f"(not in the catalogue of the bundle {self.folder.parent})",
                            field=field, row=where(bad[0]))
        return found.astype(np.int64)

    def histories_csr(self, histories: Sequence[Sequence], source="histories") -> CSR:
        """[B, I] rows of the histories (original ids, oldest first; ``rows_csr``). An
        unknown id names ``source`` and its position in the concatenated histories."""
        cols = self.lookup([x for h in histories for x in h], source)
        return self.rows_csr(cols, [len(h) for h in histories])

    @property
    def sequential(self) -> bool:
        """Whether the query tower reads sequences (DiffuRec)."""
        return self.cfg["model"] == "diffurec"

    def rows_csr(self, items: np.ndarray, lengths: Sequence[int]) -> CSR:
        """[B, I] rows of item indexes ``items`` (rows concatenated, oldest first) with
        ``lengths`` [B]; values 1, or the T-DiffRec recency weights when the model was
        trained with them. For a sequential model each row keeps its items in their order,
        repeats included (the sequence its query tower reads; ``model_batch``)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.sequential:
            indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            return CSR(indptr, np.asarray(items, np.int64), np.ones(len(items), np.float32),
                       self.n_items)
        r = np.repeat(np.arange(len(lengths)), lengths)
        values = np.ones(len(r), np.float32)
        tw = self.cfg["data"]["time_weights"]
        if tw and len(r):
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            order = np.arange(len(r)) - np.repeat(indptr[:-1], lengths)
            values = time_weights(indptr, order, float(tw["w_min"]), float(tw["w_max"]))
        return CSR.from_pairs(r, items, len(lengths), self.n_items, values)

    # ------------------------------------------------------------------ serving
    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override nprobe / ef_search on every unit; ConfigError for a setting that no
        unit's index kind takes (--nprobe on a flat or HNSW bundle, --ef-search on IVF)."""
        kinds = sorted({unit.kind for unit in self.units})
        takes = {key for kind in kinds for key in SEARCH_PARAMS[kind]}
        allowed = ", ".join(option(k) for k in sorted(takes)) or "no search setting"
        for key, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and key not in takes:
                raise ConfigError(f"{option(key)} does not apply to the bundle's "
                                  f"{'/'.join(kinds)} index (it takes {allowed})")
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
        k = check_setting("k", k)
        batch = self.model_batch(rows)
        seen = exclude if exclude is not None else (rows if exclude_seen else None)
        if brute_force:
            items, top = topk_excluding(self.model.score(batch).float().cpu(), seen,
                                        min(k, self.n_items))
            return items.numpy(), top.numpy()
        queries = {name: query_vectors(q.cpu().float().numpy(), self.head_dims[name])
                   for name, q in self.model.query(batch).items()}
        if seen is None and self.model.seen_scale != 0 and rows.nnz:
            # held items score seen_scale * value above their inner product (models.base):
            # the index ranks the other items, the held ones are scored here and merged
            items, scores = search_units(self.units, queries, k, rows, self.unit_of)
            held_items, held_scores = self._held_candidates(rows, queries)
            return merge_topk(np.concatenate([items, held_items], 1),
                              np.concatenate([scores, held_scores], 1), k)
        return search_units(self.units, queries, k, seen, self.unit_of)

    def model_batch(self, rows: CSR):
        """The query tower's input for the histories ``rows`` on the model's device: the
        rows themselves, or (sequential) the ``SequenceBatch`` asking for each history's
        next item (``Sequences.next_items``)."""
        device = model_device(self.model)
        if not self.sequential:
            return rows.to_torch(device)
        histories = Sequences("histories", rows.indices, rows.indptr, self.n_items,
                              max_len=self.cfg["diffurec"]["max_len"])
        return histories.next_items(device)

    def _held_candidates(self, rows: CSR, queries: dict) -> tuple[np.ndarray, np.ndarray]:
        """Each row's own items [B, L] (-1 padding) with their exact scores [B, L]."""
        lengths = rows.row_lengths()
        r = rows.row_ids()
        cols = rows.indices.astype(np.int64)
        scores = np.zeros(len(cols), np.float32)
        for head in self.model.item_heads():
            row_of = np.full(self.n_items, -1, np.int64)
            row_of[head.items.cpu().numpy()] = np.arange(len(head.items))
            sel = row_of[cols] >= 0
            vectors = with_bias(head.weight, head.bias, 0, len(head.items)).cpu().float()
            vectors = vectors.numpy()[row_of[cols[sel]]]
            scores[sel] = np.einsum("ij,ij->i", queries[head.name][r[sel], :vectors.shape[1]],
                                    vectors)
        scores += np.float32(self.model.seen_scale) * rows.values.astype(np.float32)
        width = int(lengths.max(initial=0))
        items = np.full((rows.n_rows, width), -1, np.int64)
        padded = np.full((rows.n_rows, width), -np.inf, np.float32)
        col = np.arange(len(cols)) - rows.indptr[r]
        items[r, col], padded[r, col] = cols, scores
        return items, padded

    def recommend(self, histories: Sequence[Sequence], k: int = 20, exclude_seen: bool = True,
                  brute_force: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k original item ids [B, k] and scores [B, k] for histories of original ids
        (ints or strs, as the bundle's); slots beyond the catalogue's unseen items hold
        score -inf and id -1 (None for string ids)."""
        idx, scores = self.recommend_indexes(self.histories_csr(histories), k, exclude_seen,
                                             brute_force)
        ids = self.item_ids[np.maximum(idx, 0)]
        ids[idx < 0] = None if self.id_kind == "str" else -1
        return ids, scores
