"""The CLI end to end on tiny synthetic data: train, evaluate, resume, refuse bad input."""
import json
import re

import pytest
import torch

from scale_diffrec import runs
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


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """main() logs to the sys.stdout of the first call; each test gets its own (capsys)."""
    from scale_diffrec.progress import log
    log.handlers.clear()
    yield
    log.handlers.clear()


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


# ------------------------------------------------------- bad config, guarded run directory
def _files(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file()}


def _one_error_line(capsys, *words):
    """The one 'error:' line of a main() that returned 2 (a traceback of ours would have
    raised instead; other lines on stderr may come from a Ray session of earlier tests)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("sets, key", [
    (["lr=-1"], "'lr'"), (["batch_size=-5"], "'batch_size'"), (["batch_size=0"], "'batch_size'"),
    (["eval_every=0"], "'eval_every'"), (["epochs=0"], "'epochs'"),
    (["diffusion.noise_min=0.02", "diffusion.noise_max=0.005"], "'diffusion.noise_min'"),
    (["diffusion.noise_min=0"], "'diffusion.noise_min'"),
    (["diffusion.noise_scale=0"], "'diffusion.noise_scale'"),
    (["diffusion.schedule=linear", "diffusion.noise_scale=100"], "'diffusion.noise_scale'"),
    (["diffusion.steps=1"], "'diffusion.steps'"),
    (["diffusion.sampling_steps=6"], "'diffusion.sampling_steps'"),
    (["model=foo"], "'model'"), (["topk=[10,50]"], "'select_metric'"),
    (["ldiffrec.in_dims=[2]"], "'ldiffrec.in_dims'")])
def test_bad_config_exits_2_before_anything_is_written(tmp_path, capsys, sets, key):
    assert _train(tmp_path, "fresh", *sets) == 2
    line = _one_error_line(capsys, "config key", key)
    assert re.match(rf"error: --set {re.escape(sets[-1])}: ", line) or \
        re.match(rf"error: --set {re.escape(sets[0])}: ", line), line     # the override at fault
    assert not (tmp_path / "fresh").exists()


def test_a_failed_overwrite_or_resume_changes_nothing(tmp_path, capsys):
    assert _train(tmp_path, "run", "epochs=1", model="ldiffrec") == 0
    before = _files(tmp_path / "run")
    for sets, flags, words in [
            (["model=foo"], ["--resume"], ["'model'"]),
            (["model=foo"], ["--overwrite"], ["'model'"]),
            (["lr=-1"], ["--overwrite"], ["'lr'"]),
            (["lr=0.5"], ["--resume"], ["config.yaml", "--resume cannot change", "'lr'"]),
            (["ldiffrec.n_clusters=2"], ["--resume"], ["'ldiffrec.n_clusters'"]),
            (["seed=5"], ["--resume"], ["'seed'"]),
            ([], ["--resume", "--overwrite"], ["pass one"]),
            ([], [], ["already holds a run"])]:
        assert _train(tmp_path, "run", "epochs=1", *sets, flags=flags, model="ldiffrec") == 2
        _one_error_line(capsys, *words)
        assert _files(tmp_path / "run") == before, (sets, flags)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run")]) == 0      # still a good run


def test_a_folder_of_other_files_is_not_trained_into(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert _train(tmp_path, "mine", "epochs=1") == 2
    _one_error_line(capsys, f"{mine}: holds other files (notes.txt), not a run")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert _train(tmp_path, "mine", "epochs=1", flags=["--overwrite"]) == 0   # beside them
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "metrics.json").is_file()


def test_an_unreachable_ray_address_is_one_line_before_anything(tmp_path, capsys):
    assert _train(tmp_path, "far", "epochs=1", flags=["--workers", "2", "--address",
                                                      "127.0.0.1:1"], model="ldiffrec") == 2
    _one_error_line(capsys, "Ray cluster address 127.0.0.1:1: cannot connect")
    assert not (tmp_path / "far").exists()


def test_resume_without_a_run_writes_nothing(tmp_path, capsys):
    assert _train(tmp_path, "none", flags=["--resume"]) == 2
    _one_error_line(capsys, "no checkpoint")
    assert not (tmp_path / "none").exists()


def test_overwrite_rebuilds_the_partition_and_a_stale_one_is_refused(tmp_path, capsys):
    from scale_diffrec.partition import Partition
    run = tmp_path / "run"
    assert _train(tmp_path, "run", "epochs=1", model="ldiffrec") == 0
    assert Partition.load(run / "partition.parquet").n_clusters == 3
    assert _train(tmp_path, "run", "epochs=1", "ldiffrec.n_clusters=2", "ldiffrec.in_dims=[12]",
                  flags=["--overwrite"], model="ldiffrec") == 0
    rebuilt = Partition.load(run / "partition.parquet")
    assert rebuilt.n_clusters == 2 and rebuilt.made_by["ldiffrec.n_clusters"] == 2
    # a partition left in a run directory is reused only by the config that built it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "partition.parquet").write_bytes((run / "partition.parquet").read_bytes())
    before = _files(tmp_path / "other")
    assert _train(tmp_path, "other", "epochs=1", model="ldiffrec") == 2
    _one_error_line(capsys, "partition.parquet", "'ldiffrec.n_clusters' is 3")
    assert _train(tmp_path, "other", "epochs=1", "ldiffrec.n_clusters=2",
                  "ldiffrec.emb_dim=3", model="ldiffrec") == 2
    _one_error_line(capsys, "partition.parquet", "'ldiffrec.emb_dim'")
    assert _files(tmp_path / "other") == before
    assert _train(tmp_path, "other", "epochs=1", "ldiffrec.n_clusters=2",
                  model="ldiffrec") == 0
    assert Partition.load(tmp_path / "other" / "partition.parquet") == rebuilt


@pytest.mark.parametrize("edit, pattern", [
    (("data", "synthetic", "seed", 5),
     r"config\.yaml: config key 'data\.synthetic\.seed' \(0 -> 5\) differs from the run's"),
    (("diffusion", "noise_scale", 0.2),
     r"config\.yaml: config key 'diffusion\.noise_scale' \(0\.1 -> 0\.2\) differs"),
    ("data", r"inputs\.json: data changed since the run was trained"),
    ("partition", r"partition\.parquet: partition\.parquet changed since the run was trained")])
def test_a_run_whose_inputs_changed_is_refused_by_evaluate_export_and_resume(
        tmp_path, capsys, edit, pattern):
    import numpy as np
    from scale_diffrec.partition import Partition
    assert _train(tmp_path, "run", "epochs=1", "data.synthetic.seed=0", "diffusion.noise_scale=0.1",
                  model="ldiffrec") == 0
    run = tmp_path / "run"
    config = run / "config.yaml"
    if edit == "data":      # same keys, other data: the run's inputs.json records the data
        saved = json.loads((run / "inputs.json").read_bytes().split(b"\nscale_diffrec")[0])
        saved["data"]["digest"] = "0" * 32       # as if the data file had other content
        from scale_diffrec.files import write_sealed
        write_sealed(run / "inputs.json", lambda f: f.write(json.dumps(saved).encode()))
    elif edit == "partition":
        p = Partition.load(run / "partition.parquet")
        a = int(np.flatnonzero(p.cluster_of == 0)[0])
        b = int(np.flatnonzero(p.cluster_of == 1)[0])
        swapped = p.cluster_of.copy()
        swapped[[a, b]] = swapped[[b, a]]
        moved = Partition(swapped, p.n_clusters)
        moved.made_by = p.made_by
        moved.save(run / "partition.parquet")
    else:
        import yaml
        edited = yaml.safe_load(config.read_text())
        inner = edited
        for key in edit[:-2]:
            inner = inner[key]
        inner[edit[-2]] = edit[-1]
        config.write_text(yaml.safe_dump(edited))
    capsys.readouterr()
    for args in (["evaluate", "--run", str(run)],
                 ["export", "--run", str(run), "--out", str(tmp_path / "export")]):
        assert main(args) == 2
        assert re.search(pattern, _one_error_line(capsys))
    if edit in ("data", "partition"):
        assert _train(tmp_path, "run", "epochs=2", "data.synthetic.seed=0",
                      "diffusion.noise_scale=0.1", model="ldiffrec", flags=["--resume"]) == 2
        assert re.search(pattern, _one_error_line(capsys))
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1


def test_a_run_recorded_before_a_config_key_existed_still_loads(tmp_path, capsys):
    # inputs.json of a run trained before 'lr_decay' was a key: evaluate and export load it
    from scale_diffrec.files import write_sealed
    assert _train(tmp_path, "run", "epochs=1") == 0
    run = tmp_path / "run"
    saved = json.loads((run / "inputs.json").read_bytes().split(b"\nscale_diffrec")[0])
    del saved["config"]["lr_decay"]
    write_sealed(run / "inputs.json", lambda f: f.write(json.dumps(saved).encode()))
    assert main(["evaluate", "--run", str(run)]) == 0
    saved["config"]["lr_decay"] = 0.5                 # a recorded value that differs still fails
    write_sealed(run / "inputs.json", lambda f: f.write(json.dumps(saved).encode()))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 2
    assert "config key 'lr_decay' (0.5 -> 0.1) differs" in _one_error_line(capsys)


def test_resumed_finished_runs_do_not_train_again(tmp_path, caplog):
    assert _train(tmp_path, "stop", "epochs=40", "patience=1", "lr=0.05") == 0
    last = torch.load(tmp_path / "stop" / "checkpoints" / "last.pt", weights_only=False)
    assert last["record"]["early_stop"]["epoch"] == last["epoch"] < 40
    metrics = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    metrics["peak_rss_mib"] = 123456.0        # the training process's figure, not the no-op's
    runs.write_json(tmp_path / "stop" / "metrics.json", metrics)
    for _ in range(2):
        caplog.clear()
        assert _train(tmp_path, "stop", "epochs=40", "patience=1", "lr=0.05",
                      flags=["--resume"]) == 0
        assert "stopped early" in caplog.text and "nothing to train" in caplog.text
        again = torch.load(tmp_path / "stop" / "checkpoints" / "last.pt", weights_only=False)
        assert again["epoch"] == last["epoch"]
        assert json.loads((tmp_path / "stop" / "metrics.json").read_text())["history"] == \
            metrics["history"]
        assert json.loads((tmp_path / "stop" / "metrics.json").read_text())["peak_rss_mib"] \
            == 123456.0
    # a run that trained all its epochs: the same
    assert _train(tmp_path, "all", "epochs=1") == 0
    caplog.clear()
    assert _train(tmp_path, "all", "epochs=1", flags=["--resume"]) == 0
    assert "trained all 1 epochs" in caplog.text
    assert torch.load(tmp_path / "all" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1


# ------------------------------------------------------------------ non-finite numbers
def test_a_diverging_run_stops_naming_epoch_and_step_and_keeps_the_last_good_epoch(
        tmp_path, capsys, monkeypatch):
    # Mult-VAE at lr 1e6 reaches loss nan in its first epoch: exit 2, no model kept
    assert _train(tmp_path, "lr", "epochs=5", "lr=1e6", model="multvae") == 2
    _one_error_line(capsys, "training loss at epoch 1, step", "is not finite (nan)")
    assert not (tmp_path / "lr" / "checkpoints").exists()
    # a run that diverges at epoch 2, step 3 keeps epoch 1's checkpoints as they were
    assert _train(tmp_path, "run", "epochs=1", model="multvae") == 0
    before = _files(tmp_path / "run" / "checkpoints")
    from scale_diffrec.models.multvae import MultVAE
    real, calls = MultVAE.training_loss, []

    def diverging(self, batch, progress):
        calls.append(1)
        terms = real(self, batch, progress)
        return {**terms, "loss": terms["loss"] * float("inf")} if len(calls) == 3 else terms
    monkeypatch.setattr(MultVAE, "training_loss", diverging)
    assert _train(tmp_path, "run", "epochs=3", flags=["--resume"], model="multvae") == 2
    _one_error_line(capsys, "training loss at epoch 2, step 3 is not finite",
                    "last.pt is the last good epoch")
    assert _files(tmp_path / "run" / "checkpoints") == before


def test_non_finite_parameters_are_refused_by_resume_evaluate_and_export(tmp_path, capsys):
    assert _train(tmp_path, "run", "epochs=1") == 0
    run = tmp_path / "run"
    for name in ("last", "best"):            # diverged weights, saved (and sealed) as such
        state = runs.load_checkpoint(run, name)
        key = next(iter(state["model"]))
        state["model"][key].view(-1)[0] = float("inf")
        runs.save_checkpoint(run, name, state)
    before = _files(run)
    assert _train(tmp_path, "run", "epochs=2", flags=["--resume"]) == 2
    _one_error_line(capsys, "last.pt", "parameter", "not finite")
    assert _files(run) == before
    assert main(["evaluate", "--run", str(run)]) == 2
    _one_error_line(capsys, "best.pt", "not finite")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "index")]) == 2
    _one_error_line(capsys, "best.pt", "not finite")
    assert not (tmp_path / "index").exists()


def test_evaluation_refuses_nan_scores():
    from scale_diffrec.data import load_data
    from scale_diffrec.evaluate import evaluate
    from scale_diffrec.errors import NonFiniteError
    from scale_diffrec.config import load_config
    data = load_data(load_config(None, TINY))

    from scale_diffrec.models import Recommender

    class NaNModel(Recommender):
        def score(self, batch):
            out = torch.zeros(batch.batch_size, data.n_items)
            out[:, 3] = float("nan")          # would rank first in torch.topk
            return out
    with pytest.raises(NonFiniteError, match="valid scores of users 0..119 .*not finite"):
        evaluate(NaNModel(), data, "valid", ks=[10, 20])
