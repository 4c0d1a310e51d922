"""Placement of item clusters on workers (DESIGN.md, "Hybrid parallelism").

``plan_placement`` assigns the C clusters to W workers by LPT (longest processing time
first): clusters in decreasing load, each to the currently least-loaded worker (ties: the
lower cluster index goes first; among equally loaded workers the one with fewer clusters,
then the lower index). Load is the cluster's item count
(``weight="items"``) or its parameter count (``weight="params"``, from ``decoder_params``).
LPT guarantees max load <= (4/3 - 1/(3W)) x the optimum.

The global latent vector is z = concat_c z_c in CLUSTER order (the single-process model's
order). Worker r holds its clusters in increasing cluster index; its latent columns are
``Plan.latent_columns(r)`` (global indexes, in that order), which is exactly what
``collectives.rows_to_owners(..., col_index=plan.col_index())`` needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["Plan", "plan_placement", "split_rows"]

WEIGHTS = ("items", "params")


def split_rows(batch_size: int, n_workers: int) -> list[int]:
    """Users per worker for a global batch: as equal as possible, the first B % W get one more."""
    if batch_size < 0 or n_workers < 1:
        raise ValueError(f"split_rows: need batch_size >= 0 and n_workers >= 1, "
                         f"got {batch_size}, {n_workers}")
    q, rem = divmod(batch_size, n_workers)
    return [q + (1 if r < rem else 0) for r in range(n_workers)]


@dataclass
class Plan:
    """Which worker holds which clusters, and what that costs each worker.

    cluster_sizes [C]: items per cluster. assignment [W]: sorted cluster ids per worker.
    latent_dims [C] (optional): latent width of each cluster (global latent = cluster order).
    decoder_params [C] (optional): parameters that live with each cluster (its encoder and
    decoder, or its columns of a global linear decoder), as the caller counts them.
    bytes_per_param: 4 counts fp32 weights only; 16 counts weights + grads + Adam's two moments.
    """
    cluster_sizes: list[int]
    assignment: list[list[int]]
    weight: str = "items"
    latent_dims: list[int] | None = None
    decoder_params: list[int] | None = None
    bytes_per_param: int = 4
    _owner: list[int] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        self.cluster_sizes = [int(s) for s in self.cluster_sizes]
        self.assignment = [sorted(int(c) for c in cs) for cs in self.assignment]
        c = len(self.cluster_sizes)
        owner = [-1] * c
        for r, cs in enumerate(self.assignment):
            for k in cs:
                if not 0 <= k < c:
                    raise ValueError(f"Plan: worker {r} holds unknown cluster {k} (C = {c})")
                if owner[k] != -1:
                    raise ValueError(f"Plan: cluster {k} placed on workers {owner[k]} and {r}")
                owner[k] = r
        missing = [k for k in range(c) if owner[k] == -1]
        if missing:
            raise ValueError(f"Plan: clusters {missing} are not placed on any worker")
        for name in ("latent_dims", "decoder_params"):
            v = getattr(self, name)
            if v is not None:
                v = [int(x) for x in v]
                if len(v) != c:
                    raise ValueError(f"Plan: {name} has {len(v)} entries for {c} clusters")
                setattr(self, name, v)
        self._owner = owner

    # ---- sizes ---------------------------------------------------------------------
    @property
    def n_workers(self) -> int:
        return len(self.assignment)

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_sizes)

    def owner(self, cluster: int) -> int:
        """The worker that holds ``cluster``."""
        return self._owner[cluster]

    def clusters(self, worker: int) -> list[int]:
        return list(self.assignment[worker])

    def items(self, worker: int) -> int:
        return sum(self.cluster_sizes[c] for c in self.assignment[worker])

    def parameters(self, worker: int) -> int | None:
        if self.decoder_params is None:
            return None
        return sum(self.decoder_params[c] for c in self.assignment[worker])

    def bytes(self, worker: int) -> int | None:
        p = self.parameters(worker)
        return None if p is None else p * self.bytes_per_param

    def load(self, worker: int) -> int:
        """The quantity that was balanced (items or parameters)."""
        if self.weight == "params":
            return self.parameters(worker)
        return self.items(worker)

    def imbalance(self) -> float:
        """max load / mean load (1.0 = perfect)."""
        loads = [self.load(r) for r in range(self.n_workers)]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    # ---- latent columns ------------------------------------------------------------
    def _latent_offsets(self) -> list[int]:
        if self.latent_dims is None:
            raise ValueError("Plan: latent column ranges need latent_dims")
        offs = [0]
        for d in self.latent_dims:
            offs.append(offs[-1] + d)
        return offs

    @property
    def latent_dim(self) -> int:
        return self._latent_offsets()[-1]

    def latent_ranges(self, worker: int) -> list[tuple[int, int]]:
        """[(start, stop)] global latent column ranges of ``worker``, adjacent ones merged."""
        offs = self._latent_offsets()
        out: list[tuple[int, int]] = []
        for c in self.assignment[worker]:
            a, b = offs[c], offs[c + 1]
            if b == a:
                continue
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    def latent_columns(self, worker: int) -> list[int]:
        """Global latent columns of ``worker``, in its local order (clusters ascending)."""
        return [i for a, b in self.latent_ranges(worker) for i in range(a, b)]

    def col_sizes(self) -> list[int]:
        """Latent width per worker (``rows_to_owners``'s col_sizes)."""
        return [len(self.latent_columns(r)) for r in range(self.n_workers)]

    def col_index(self) -> list[list[int]]:
        """Global latent columns per worker (``rows_to_owners``'s col_index)."""
        return [self.latent_columns(r) for r in range(self.n_workers)]

    def row_splits(self, batch_size: int) -> list[int]:
        """Users of a global batch per worker (the data-parallel denoiser's rows)."""
        return split_rows(batch_size, self.n_workers)

    # ---- serialisation and display -----------------------------------------------
    def to_dict(self) -> dict:
        return {"cluster_sizes": self.cluster_sizes, "assignment": self.assignment,
                "weight": self.weight, "latent_dims": self.latent_dims,
                "decoder_params": self.decoder_params, "bytes_per_param": self.bytes_per_param}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(cluster_sizes=d["cluster_sizes"], assignment=d["assignment"],
                   weight=d.get("weight", "items"), latent_dims=d.get("latent_dims"),
                   decoder_params=d.get("decoder_params"),
                   bytes_per_param=d.get("bytes_per_param", 4))

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))

    def describe(self) -> str:
        """A table, one row per worker, for printing when training starts."""
        rows = [("worker", "clusters", "items", "params", "bytes", "latent cols", "load %")]
        total = sum(self.load(r) for r in range(self.n_workers)) or 1
        for r in range(self.n_workers):
            cl = _compact(self.assignment[r])
            p, b = self.parameters(r), self.bytes(r)
            cols = ("-" if self.latent_dims is None else
                    ",".join(f"{a}:{e}" for a, e in self.latent_ranges(r)) or "-")
            rows.append((str(r), cl, f"{self.items(r):,}", "-" if p is None else f"{p:,}",
                         "-" if b is None else _human_bytes(b), cols,
                         f"{100.0 * self.load(r) / total:.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"placement: {self.n_clusters} clusters on {self.n_workers} workers, "
                 f"balanced by {self.weight}; max/mean load = {self.imbalance():.3f}"]
        for k, row in enumerate(rows):
            lines.append("  ".join(v.rjust(w) if i != 1 and i != 5 else v.ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _compact(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, i = [], 0
    ids = list(ids)
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _human_bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def plan_placement(cluster_sizes: Sequence[int], n_workers: int, weight: str = "items",
                   latent_dims: Sequence[int] | None = None,
                   decoder_params: Sequence[int] | None = None,
                   bytes_per_param: int = 4) -> Plan:
    """Place C clusters on ``n_workers`` workers, largest first, each to the least-loaded one.

    cluster_sizes [C]: items per cluster (> 0). weight: "items" balances item counts,
    "params" balances ``decoder_params`` [C] (required then). latent_dims [C]: each cluster's
    latent width, for the latent column ranges. Every worker gets at least one cluster, so
    ``n_workers <= C`` is required.
    """
    sizes = [int(s) for s in cluster_sizes]
    c = len(sizes)
    if weight not in WEIGHTS:
        raise ValueError(f"plan_placement: weight must be one of {WEIGHTS}, got {weight!r}")
    if n_workers < 1:
        raise ValueError(f"plan_placement: n_workers must be >= 1, got {n_workers}")
    if c == 0:
        raise ValueError("plan_placement: no clusters")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"plan_placement: every cluster needs >= 1 item, got sizes {sizes}")
    if n_workers > c:
        raise ValueError(f"plan_placement: {n_workers} workers but only {c} clusters; every "
                         f"worker must own at least one cluster (use n_workers <= {c}, or "
                         f"partition the items into more clusters)")
    if weight == "params":
        if decoder_params is None:
            raise ValueError("plan_placement: weight='params' needs decoder_params (one count "
                             "per cluster)")
        loads = [int(p) for p in decoder_params]
        if len(loads) != c:
            raise ValueError(f"plan_placement: decoder_params has {len(loads)} entries for "
                             f"{c} clusters")
        if any(p < 0 for p in loads):
            raise ValueError("plan_placement: negative decoder_params")
    else:
        loads = sizes
    order = sorted(range(c), key=lambda k: (-loads[k], k))
    assignment: list[list[int]] = [[] for _ in range(n_workers)]
    load = [0] * n_workers
    count = [0] * n_workers
    for i, k in enumerate(order):
        remaining = c - i
        empty = [r for r in range(n_workers) if count[r] == 0]
        # When only as many clusters remain as workers without one, fill those first
        # (only matters for zero-load clusters under weight="params").
        pool = empty if len(empty) >= remaining else range(n_workers)
        r = min(pool, key=lambda w: (load[w], count[w], w))
        assignment[r].append(k)
        load[r] += loads[k]
        count[r] += 1
    return Plan(cluster_sizes=sizes, assignment=assignment, weight=weight,
                latent_dims=None if latent_dims is None else list(latent_dims),
                decoder_params=None if decoder_params is None else list(decoder_params),
                bytes_per_param=bytes_per_param)
