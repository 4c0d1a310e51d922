"""The CLI end to end on tiny synthetic data: train, evaluate, resume, refuse bad input."""
import json

import pytest
import torch

from scale_diffrec.cli import main

TINY = ["data.source=synthetic", "data.synthetic.n_users=120", "data.synthetic.n_items=60",
        "data.synthetic.n_clusters=3", "data.synthetic.mean_items_per_user=8",
        "batch_size=32", "eval_every=1", "topk=[10, 20]", "denoiser.dims=[16]",
        "diffusion.steps=5", "multvae.dims=[8, 16]", "ldiffrec.n_clusters=3",
        "ldiffrec.in_dims=[12]", "ldiffrec.mlp_dims=[8]", "ldiffrec.embeddings=svd",
        "ldiffrec.emb_dim=4"]
TIME_WEIGHTS = "data.time_weights={w_min: 0.1, w_max: 1.0}"


def _train(tmp_path, name, *sets, flags=(), model="diffrec"):
    args = ["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / name),
            *flags]
    for item in TINY + [f"model={model}", *sets]:
        args += ["--set", item]
    return main(args)


@pytest.fixture(autouse=True)
def _empty_config(tmp_path):
    (tmp_path / "none.yaml").write_text("{}\n")


@pytest.mark.parametrize("model, sets", [
    ("diffrec", []), ("multvae", []), ("ldiffrec", []), ("ldiffrec", ["ldiffrec.out_dims=[6]"]),
    ("diffrec", [TIME_WEIGHTS]), ("ldiffrec", [TIME_WEIGHTS])],
    ids=["diffrec", "multvae", "ldiffrec", "ldiffrec-cluster-decoders", "t-diffrec", "lt-diffrec"])
def test_train_writes_metrics_and_evaluate_reproduces_them(tmp_path, capsys, model, sets):
    assert _train(tmp_path, "run", "epochs=2", *sets, model=model) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all(h["loss"] == h["loss"] and h["seconds"] > 0 for h in metrics["history"])
    assert metrics["convention"] == "reference"
    assert {"recall@20", "ndcg@20", "precision@10", "mrr@10"} <= set(metrics["test"])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("recall@10", "recall@20", "ndcg@20"):
        assert printed[key] == pytest.approx(metrics["test"][key], abs=1e-12)


@pytest.mark.parametrize("model", ["diffrec", "ldiffrec"])
def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path, model):
    assert _train(tmp_path, "straight", "epochs=3", model=model) == 0
    assert _train(tmp_path, "split", "epochs=1", model=model) == 0
    assert _train(tmp_path, "split", "epochs=3", flags=["--resume"], model=model) == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert ma["test"] == mb["test"]


def test_existing_run_is_refused_and_bad_data_overwrites_nothing(tmp_path, capsys):
    assert _train(tmp_path, "run", "epochs=1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert _train(tmp_path, "run", "epochs=1") == 2
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_text("user_id,item_id\n1,2\n")
    assert _train(tmp_path, "run", "epochs=1", "data.source=parquet",
                  f"data.path={bad}", flags=["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bad.parquet" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
