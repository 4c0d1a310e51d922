"""Shared fixtures: one local Ray instance for the whole test session, started on first use.

A Ray test asks for ``ray_local``; tests that need no Ray never start it. The instance is
new and private to the session (``address="local"``: never a cluster that something else on
this machine started), has no dashboard (it costs ~1 GB here) and token authentication off
(it listens on this machine only for the session's lifetime).
"""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """The session's Ray instance (3 logical CPUs: 2 training workers and some slack)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: on tiny matrices its thread pool costs more than it
    gains (40x on a busy CPU)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
