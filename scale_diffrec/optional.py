"""Optional dependencies: faiss comes from an extra, never from the base install.

faiss-cpu and faiss-gpu install the same ``faiss`` module and must not be installed
together, so neither is a base dependency (pyproject.toml: ``[cpu]`` or ``[gpu]``).
Training and evaluation of DiffRec and Mult-VAE, and of L-DiffRec with a given partition,
run without it; exporting, recommending and L-DiffRec's k-means partition need it.
"""
from __future__ import annotations

from .errors import ConfigError


def require_faiss(purpose: str, alternative: str | None = None):
    """The ``faiss`` module, or a one-line ConfigError: '<purpose> needs faiss: pip install
    ...' (and ', or <alternative>' when there is another way)."""
    try:
        import faiss
    except ImportError:
        other = f", or {alternative}" if alternative else ""
        raise ConfigError(f"{purpose} needs faiss: pip install 'scale-diffrec[cpu]' (or "
                          f"'scale-diffrec[gpu]' on a CUDA machine){other}") from None
    return faiss
