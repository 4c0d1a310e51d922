"""Retrieval: export a trained run as a FAISS index bundle and serve top-K from it.

DESIGN.md, "Retrieval": every model's output layer is linear, so its top-K over the
catalogue is a maximum-inner-product search of [query, 1] against item vectors [W_i, b_i].
The names below are imported on first use, so that ``scale_diffrec`` runs without faiss
(``optional``) until a bundle is exported or served.
"""
from __future__ import annotations

import importlib

_WHERE = {"Retriever": ".retriever", "export": ".bundle", "read_manifest": ".bundle",
          "resolve": ".bundle"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
