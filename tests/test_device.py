"""Device and precision plumbing (the ``device`` / ``precision`` keys, scale_diffrec/device.py).

Parametrised over the devices present: the CUDA cases skip with a reason on a machine
without a GPU (CI); ``benchmarks/gpu.py`` measures the GPU itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_diffrec.config import load_config
from scale_diffrec.data import load_data
from scale_diffrec.errors import ConfigError
from scale_diffrec.device import autocast, chunk_items, resolve_device
from scale_diffrec.evaluate import evaluate
from scale_diffrec.models import Progress, build_model
from scale_diffrec.train import prepare_partition, train

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
MODELS = {
    "multvae": ["model=multvae"],
    "diffrec": ["model=diffrec"],
    "tdiffrec": ["model=diffrec", "data.time_weights={w_min: 0.1, w_max: 1.0}"],
    "ldiffrec": ["model=ldiffrec"],
    "ldiffrec-per-cluster": ["model=ldiffrec", "ldiffrec.out_dims=[16]"],
    "ltdiffrec": ["model=ldiffrec", "data.time_weights={w_min: 0.1, w_max: 1.0}"],
}
TINY = ["data.synthetic.n_users=200", "data.synthetic.n_items=120", "batch_size=50",
        "eval_batch_size=64"]


def tiny(overrides: list[str]):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides + TINY)
    data = load_data(cfg)
    return cfg, data, prepare_partition(cfg, data, None)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="config key 'device': expected auto, cpu"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="config key 'device'"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")   # one past the last GPU


def test_chunk_items_follows_the_memory_budget():
    assert chunk_items(500, "cpu") == 8 * 2 ** 20 // (4 * 500)          # 8 MiB on the CPU
    assert chunk_items(500, "cuda") == 1024 * 2 ** 20 // (4 * 500)      # 1 GiB on a GPU
    assert chunk_items(1000, "cpu", chunk_mib=1) == 2 ** 20 // 4000
    assert chunk_items(10 ** 9, "cpu", chunk_mib=1) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_one_line_error_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scale_diffrec", "train", "--config",
                           str(ROOT / "configs" / "quickstart.yaml"), "--set", "device=cuda",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config key 'device': 'cuda' asked for")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bf16_logsumexp_accumulates_in_fp32():
    from scale_diffrec.models.linear_logsumexp import chunked_logsumexp
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    ref = torch.logsumexp(h @ w.T + b, 1)
    ref_grads = torch.autograd.grad(ref.sum(), [h, w, b])
    for chunk in (7, 50):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = chunked_logsumexp(h, w, b, chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0.1)   # bf16 logits: ~3 digits
        grads = torch.autograd.grad(got.sum(), [h, w, b])
        for a, r in zip(grads, ref_grads):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, r, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_loss_close_to_fp32(name):
    """The same batch and parameters: the bf16-autocast loss within 2% of fp32's."""
    cfg, data, partition = tiny(MODELS[name])
    torch.manual_seed(0)
    model = build_model(cfg, data.n_items, partition)
    batch = data.train.take_rows(list(range(50))).to_torch()
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        with autocast(torch.device("cpu"), precision):
            losses[precision] = model.training_loss(batch, Progress(step=0))["loss"].item()
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * abs(losses["fp32"])


@pytest.mark.parametrize("name", list(MODELS))
def test_no_tensor_on_the_default_device_by_accident(name):
    """With the default device set to ``meta``, a factory call that forgets its device makes
    a meta tensor, and mixing it with the batch's fails: the hot path must not."""
    cfg, data, partition = tiny(MODELS[name])
    model = build_model(cfg, data.n_items, partition)
    batch = data.train.take_rows(list(range(50))).to_torch()
    with torch.device("meta"):
        loss = model.training_loss(batch, Progress())["loss"]
        loss.backward()
        scores = model.score(batch)
        metrics = evaluate(model, data, "valid", ks=(20,), batch_size=64)
    assert loss.device.type == scores.device.type == "cpu"
    assert 0.0 <= metrics["recall@20"] <= 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["multvae", "ldiffrec-per-cluster"])
def test_train_evaluate_export_recommend_honour_device(tmp_path, device, name):
    from scale_diffrec.retrieval import Retriever
    from scale_diffrec.retrieval.bundle import export
    from scale_diffrec.runs import load_run
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      MODELS[name] + TINY + ["epochs=1", f"device={device}",
                                             "precision=bf16"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["device"].startswith(device) and metrics["precision"] == "bf16"
    run = load_run(tmp_path / "run", device=device)
    assert {p.device.type for p in run.model.parameters()} == {device}
    export(run, tmp_path / "index")
    retriever = Retriever.load(tmp_path / "index", device=device)
    assert {p.device.type for p in retriever.model.parameters()} == {device}
    history = [int(retriever.item_ids[0]), int(retriever.item_ids[3])]
    items, _ = retriever.recommend([history], k=10)
    brute, _ = retriever.recommend([history], k=10, brute_force=True)
    assert items[0].tolist() == brute[0].tolist()


def test_gpu_benchmark_runs_small_without_a_gpu(tmp_path):
    """``benchmarks/gpu.py`` on a machine without a GPU: the same code paths at a small
    size, the GPU-only parts marked skipped with the reason."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu.py itself")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--epochs", "1",
                           "--items", "3000", "--users", "300", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["epochs"]) == {"multvae", "diffrec", "ldiffrec", "tdiffrec", "ltdiffrec"}
    for row in result["epochs"].values():
        assert len(row["cpu"]["epoch_seconds"]) == 1 and 0 <= row["cpu"]["valid_recall@20"] <= 1
    for part in ("precisions", "one_process_1m", "sharded_1m", "faiss_gpu"):
        assert result[part] == {"skipped": "no CUDA GPU visible to torch"}
    assert result["one_process_1m_cpu_small"]["items"] == 3000


def test_kmeans_without_faiss_names_the_extra(monkeypatch):
    from scale_diffrec.partition import Partition
    monkeypatch.setitem(sys.modules, "faiss", None)          # import faiss -> ImportError
    with pytest.raises(ConfigError, match=r"needs faiss: pip install 'scale-diffrec\[cpu\]'"):
        Partition.kmeans(torch.randn(20, 4).numpy(), 3)
