"""What every recommender in scale_diffrec offers the trainer, the evaluator and export.

Input is always a batch of CSR rows (``SparseRows`` [B, I], values = interaction weights).

Two kinds of model: those trained by gradient steps (``training_loss``) and
``FittedRecommender``s, fitted once on the whole train matrix (``fit``; the baselines).

Retrieval identity (DESIGN.md, "Retrieval"): each model's output layer is linear, so its
scores split into *heads*. Head h covers the items ``items_h`` [I_h] with a weight
[I_h, d_h] and a bias [I_h]; for a batch the model gives a query [B, d_h] per head, and

    score(batch)[:, items_h] == query(batch)[h] @ weight_h.T + bias_h + seen_scale * batch

(up to float rounding; ``seen_scale`` is 0 except for DiffRec with mean_type "eps", whose
score adds the input itself). One head for DiffRec's last layer, Mult-VAE's decoder, or
L-DiffRec's global linear decoder; one head per cluster for L-DiffRec with per-cluster
decoders. A model setting whose scores are not of this form says why in ``export_error``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.csr import CSR, SparseRows


@dataclass
class Progress:
    """Where training stands, for annealing: ``epoch`` (0-based) and ``step`` (batches done)."""
    epoch: int = 0
    step: int = 0


@dataclass
class ItemHead:
    """Items ``items`` [I_h] (global item indexes) scored as query @ weight.T + bias."""
    name: str
    items: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


class Recommender(nn.Module):
    """Interface; subclasses implement the four methods."""

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        """{'loss': scalar to minimise, other scalar terms for logging}."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        """[B, I] ranking scores over the whole catalogue (eval mode, deterministic)."""
        raise NotImplementedError

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        """{head name: [B, d_h]} query vectors (eval mode)."""
        raise NotImplementedError

    def item_heads(self) -> list[ItemHead]:
        """The linear heads of the scores; a model without them does not define this
        (``evaluate.has_linear_heads``) and cannot be exported to a FAISS bundle."""
        raise NotImplementedError

    #: the score of an item the row holds minus its head's inner product, per unit of input
    seen_scale: float = 0.0

    def export_error(self) -> str | None:
        """None when the scores are the heads' inner products (module docstring), else one
        line saying why this model setting cannot be exported as an index."""
        return None

    @torch.no_grad()
    def score_chunks(self, batch: SparseRows, chunk: int):
        """(scores [B, n], items [n]) blocks of at most ``chunk`` items covering the
        catalogue in item order, for models without linear heads (the evaluator scores
        linear heads itself). Default: column slices (views) of ``score``."""
        scores = self.score(batch)
        expected = (batch.batch_size, batch.n_cols)
        if tuple(scores.shape) != expected:
            raise ValueError(f"model.score returned shape {tuple(scores.shape)}, "
                             f"expected {expected}")
        items = torch.arange(scores.shape[1], device=scores.device)
        for s in range(0, scores.shape[1], chunk):
            yield scores[:, s:s + chunk], items[s:s + chunk]


class FittedRecommender(Recommender):
    """A model fitted once on the train matrix, without gradient steps: training is one
    call of ``fit`` (the trainer's single epoch), then the usual validation, selection and
    metrics. Its fitted tensors are buffers whose shapes are known only after ``fit``;
    ``load_state_dict`` takes them as saved, on the device of the buffers they replace."""

    def fit(self, train: CSR) -> None:
        """Fit on the train matrix [U, I] (values: interaction weights)."""
        raise NotImplementedError

    def parameter_counts(self) -> dict[str, int]:
        """{"total": its fitted values}: the buffers' elements (ALS's item factors, EASE's
        B, ItemKNN's neighbour lists with their indices, most-popular's counts); 0 before
        ``fit``."""
        return {"total": sum(b.numel() for b in self.buffers())}

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} is fitted once by fit(train), "
                        f"not by gradient steps")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        for name in self._buffers:
            key = prefix + name
            if key in state_dict:
                old = self._buffers[name]          # keep the buffer's device, as copy_ would
                self._buffers[name] = state_dict[key].detach().to(old.device, copy=True)
            elif strict:
                missing_keys.append(key)
