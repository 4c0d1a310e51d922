"""Retrieval: export a trained run as a FAISS index bundle and serve top-K from it.

DESIGN.md, "Retrieval": every model's output layer is linear, so its top-K over the
catalogue is a maximum-inner-product search of [query, 1] against item vectors [W_i, b_i].
"""
from .bundle import export, read_manifest
from .retriever import Retriever

__all__ = ["Retriever", "export", "read_manifest"]
