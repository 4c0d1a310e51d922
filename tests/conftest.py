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


class TensorBoardScalars:
    """Reads back tensorboardX event files: ``scalars(log_dir)`` -> {tag: [(step, value)]}
    (TFRecord framing; tensorboardX writes "@" in a tag as "_")."""

    def __call__(self, log_dir) -> dict[str, list[tuple[int, float]]]:
        import struct
        from pathlib import Path
        from tensorboardX.proto.event_pb2 import Event
        out: dict = {}
        for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
            data = path.read_bytes()
            pos = 0
            while pos < len(data):
                (length,) = struct.unpack("<Q", data[pos:pos + 8])
                event = Event.FromString(data[pos + 12:pos + 12 + length])
                pos += 12 + length + 4
                for value in event.summary.value:
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
        return out

    def assert_history(self, log_dir, history: list[dict]) -> None:
        """The folder holds a run's metrics.json ``history``: every epoch's loss, every
        evaluation's valid recall@20, at step = epoch."""
        scalars = self(log_dir)
        assert scalars["train/loss"] == [(h["epoch"], pytest.approx(h["loss"], rel=1e-6))
                                         for h in history]
        assert scalars["valid/recall_20"] == [
            (h["epoch"], pytest.approx(h["valid"]["recall@20"], rel=1e-6))
            for h in history if "valid" in h]


@pytest.fixture
def tensorboard_scalars():
    return TensorBoardScalars()
