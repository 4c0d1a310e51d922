"""``scale-diffrec tune`` (scale_diffrec/tune/) and the training hook it uses.

Without Ray: space files parse into the choices they list (joint choices included) and
refuse malformed input with one line naming the file and key, before anything is written;
the train loop's ``on_epoch`` hook sees every epoch and Tune's report only the evaluations;
``test=False`` leaves the test split alone until the selected run is finished; the progress
line counts trials by state; ``train --log-dir`` writes TensorBoard scalars, on rank 0 only
when W gloo ranks call it (the Ray 2-worker run's are checked in test_ray_trainer). With Ray (marked
``ray``): a 3-trial search on a local cluster, interrupted by SIGINT and resumed, selects the
trial whose run reached the highest valid metric, and its run directory works with
``evaluate``; a DiffuRec trial on the paper-diffurec space runs end to end on the quickstart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from scale_diffrec import runs
from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.train import train
from scale_diffrec.tune.progress import STOPPED, ended_state, summary_line
from scale_diffrec.tune.results import finish_best
from scale_diffrec.tune.space import load_space
from scale_diffrec.tune.trial import evaluation_report

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": "ldiffrec", "seed": 0, "epochs": 4, "batch_size": 100, "eval_every": 2,
        "patience": 10, "topk": [10, 20],
        "data": {"source": "synthetic", "name": "tiny",
                 "synthetic": {"n_users": 300, "n_items": 200, "n_clusters": 4,
                               "mean_items_per_user": 10, "seed": 0}},
        "diffusion": {"steps": 5},
        "ldiffrec": {"n_clusters": 2, "in_dims": [12], "mlp_dims": [8],
                     "embeddings": "svd", "emb_dim": 4}}
SPACE = {"search": "random",
         "scheduler": {"grace_period": 2, "reduction_factor": 2},
         "params": {"lr": [1.0e-4, 1.0e-3, 1.0e-2],
                    "diffusion.noise_min,diffusion.noise_max": [[5.0e-4, 5.0e-3],
                                                                [5.0e-3, 1.0e-2]]}}

START = {"lr": 1.0e-2, "diffusion.noise_min,diffusion.noise_max": [5.0e-3, 1.0e-2]}
FIRST = {"lr": 1.0e-4, "diffusion.noise_min,diffusion.noise_max": [5.0e-4, 5.0e-3]}


def _write(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


@pytest.fixture
def files(tmp_path):
    return _write(tmp_path / "tiny.yaml", TINY), _write(tmp_path / "space.yaml", SPACE)


# ----------------------------------------------------------------------------- space files
def test_space_choices_round_trip_into_the_config(files):
    config, space_file = files
    space = load_space(space_file)
    assert space.search == "random" and space.grid_size == 6
    assert [p.name for p in space.params] == ["lr", "diffusion.noise_min,diffusion.noise_max"]
    labels = space.params[1].labels
    assert labels == ["[0.0005, 0.005]", "[0.005, 0.01]"]
    chosen = {"lr": space.params[0].labels[2], space.params[1].name: labels[1]}
    assert space.values(chosen) == {"lr": 1.0e-2, "diffusion.noise_min": 5.0e-3,
                                    "diffusion.noise_max": 1.0e-2}
    cfg = load_config(config, space.overrides(chosen))
    assert (cfg["lr"], cfg["diffusion"]["noise_min"], cfg["diffusion"]["noise_max"]) == (
        1.0e-2, 5.0e-3, 1.0e-2)
    assert load_space(space_file, "grid").search == "grid"


def test_a_space_extends_another_and_starts_from_points_of_its_grid(tmp_path, files):
    _, paper = files
    (tmp_path / "row").mkdir()
    child = _write(tmp_path / "row" / "child.yaml",
                   {"extends": "../space.yaml", "search": "optuna", "start": [START]})
    space = load_space(child)
    parent = load_space(paper)
    assert space.params == parent.params and space.scheduler == parent.scheduler
    assert space.search == "optuna" and parent.start == ()
    assert space.start == ({"lr": "0.01",
                            "diffusion.noise_min,diffusion.noise_max": "[0.005, 0.01]"},)
    assert space.values(space.start[0]) == {"lr": 1.0e-2, "diffusion.noise_min": 5.0e-3,
                                            "diffusion.noise_max": 1.0e-2}
    # the resolved form (what a search saves as OUT/space.yaml) stands alone
    alone = _write(tmp_path / "alone.yaml", space.resolved())
    again = load_space(alone)
    assert (again.params, again.start, again.search, again.scheduler) == (
        space.params, space.start, space.search, space.scheduler)
    assert load_space(child, "random").search == "random"


@pytest.mark.parametrize("change, words", [
    ({"spaces": {}}, ["unknown key 'spaces'"]),
    ({"search": "bayes"}, ["search must be one of"]),
    ({"scheduler": {"grace_period": 0}}, ["scheduler.grace_period"]),
    ({"params": {"lr": []}}, ["params 'lr'", "non-empty list"]),
    ({"params": {"diffusion.noise_min,diffusion.noise_max": [[1.0e-3]]}},
     ["joint choice of 2 keys"]),
    ({"params": {"lr": [0.1], "lr,seed": [[0.1, 1]]}}, ["key 'lr' appears in two"]),
    ({"params": {"lr": [0.1, 0.1]}}, ["lists a value twice"]),
    ({"params": {"lr": ["1e-3", 1.0e-3]}}, ["params 'lr' choices 1e-3 and 0.001 are the same "
                                            "setting"]),
    ({"params": {"diffusion.steps": [5, 5.0]}}, ["choices 5 and 5.0 are the same setting"]),
    ({"params": {"diffusion.nosie_min": [0.1]}}, ["params 'diffusion.nosie_min': unknown "
                                                  "config key 'diffusion.nosie_min'"]),
    ({"params": {"lr": [0.1, 0.2], "ldiffrec.bogus": [1, 2]}},
     ["params 'ldiffrec.bogus': unknown config key 'ldiffrec.bogus'"]),
    ({"params": {"diffusion": [{"steps": 5}, {"steps": 10}]}},
     ["params 'diffusion': 'diffusion' is a section: each value must name all its keys"]),
    ({"params": {"model": ["ldiffrec", "diffrec"]}}, ["'model' cannot be searched"]),
    ({"params": {"epochs": ["many"]}}, ["params 'epochs' choice many", "must be a number"]),
    ({"start": [{"lr": 1.0e-3}]}, ["start[0]", "'diffusion.noise_min,diffusion.noise_max' "
                                                "has no value"]),
    ({"start": [{**START, "seed": 3}]}, ["start[0]", "'seed' is not a parameter"]),
    ({"start": [START, {**START, "lr": 5.0e-4}]}, ["start[1]", "'lr' value 0.0005 is not one"]),
    ({"start": {"lr": 1.0e-3}}, ["start must be a list of points"]),
    ({"search": "grid", "start": [START]}, ["no use with search grid"]),
    ({"extends": "missing.yaml"}, ["extends", "missing.yaml", "is not a file"]),
    ({"start": [START, START]}, ["start[1] repeats start[0]"]),
    ({"params": {"denoiser.dims": [[8], [16]]}}, ["params 'denoiser.dims'", "model 'ldiffrec' "
                                                  "does not read 'denoiser.dims'"]),
    ({"extends": "space.yaml"}, ["extends", "which extends it back"]),
    ({"scheduler": {"grace_period": 2, "bogus": 3}}, ["scheduler must be", "unknown: bogus"]),
], ids=["top-key", "search", "scheduler", "empty", "joint-length", "repeated-key", "twice",
        "same-setting-as-text", "same-setting-as-float",
        "unknown-config-key", "unknown-second-key", "section", "model", "wrong-type", "start-missing", "start-unknown", "start-value",
        "start-form", "start-grid", "extends-missing", "start-twice", "unread-key",
        "extends-loop", "scheduler-unknown-key"])
def test_bad_space_file_is_one_error_line_and_writes_nothing(tmp_path, files, capsys, change,
                                                             words):
    config, space_file = files
    _write(space_file, {**SPACE, **change})
    out = tmp_path / "search"
    code = main(["tune", "--config", str(config), "--space", str(space_file), "--trials", "2",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(space_file) in err and all(w in err for w in words), err
    assert not out.exists()


def test_search_options_are_checked_before_anything_is_written(tmp_path, files, capsys,
                                                                monkeypatch):
    config, space_file = files
    out = tmp_path / "search"
    base = ["tune", "--config", str(config), "--space", str(space_file), "--out", str(out)]
    assert main(base + ["--search", "grid", "--trials", "4"]) == 2
    assert "the grid has 6 points" in capsys.readouterr().err
    assert main(base + ["--search", "optuna"]) == 2
    assert "--search optuna needs --trials N" in capsys.readouterr().err
    assert main(base + ["--search", "optuna", "--trials", "0"]) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err
    _write(space_file, {**SPACE, "start": [START, FIRST]})
    assert main(base + ["--trials", "1"]) == 2
    assert "--trials 1 is fewer than the space's 2 start points" in capsys.readouterr().err
    _write(space_file, SPACE)
    assert main(base + ["--search", "random", "--trials", "7"]) == 2
    assert "--trials 7 is more than the grid's 6 points" in capsys.readouterr().err
    for seed in ("-1", str(2 ** 32), "x"):          # numpy's and Optuna's seed range
        with pytest.raises(SystemExit) as exit_:
            main(base + ["--trials", "2", "--seed", seed])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == ("error: tune: argument --seed: must be an integer "
                                           f"from 0 to 2**32 - 1, got '{seed}'\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(base + ["--trials", "2", "--cpus-per-trial", str(os.cpu_count() + 1)]) == 2
    assert (f"--cpus-per-trial {os.cpu_count() + 1}: the local Ray instance has "
            f"{os.cpu_count()} CPUs") in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--trials", "2", "--gpus-per-trial", "1"]) == 2
        assert "the local Ray instance has 0 GPUs" in capsys.readouterr().err
    for address, words in (("127.0.0.1:1", "Ray cluster address 127.0.0.1:1: cannot connect"),
                           ("headnode", "Ray cluster address 'headnode': expected HOST:PORT")):
        assert main(base + ["--trials", "2", "--address", address]) == 2
        assert words in capsys.readouterr().err       # at once, not after Ray's retries
    assert main(["tune", "--out", str(out), "--resume", "--seed", "3"]) == 2
    assert "leave out --seed" in capsys.readouterr().err
    assert main(["tune", "--out", str(out), "--resume", "--trials", "3"]) == 2
    assert "leave out --trials" in capsys.readouterr().err
    assert main(["tune", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "leave out --overwrite" in capsys.readouterr().err
    assert main(["tune", "--out", str(out), "--resume"]) == 2
    assert "no search to resume" in capsys.readouterr().err
    for option, value, words in (("--cpus-per-trial", "0", "must be > 0, got 0"),
                                 ("--cpus-per-trial", "-1", "must be > 0, got -1"),
                                 ("--gpus-per-trial", "-1", "must be >= 0, got -1"),
                                 ("--max-concurrent", "0", "must be >= 1, got 0")):
        assert main(base + ["--trials", "2", option, value]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {option} {words}\n", err
    assert not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(base[:-1] + [str(a_file), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {a_file}: is a file; give the search's folder\n", err
    assert a_file.read_text() == ""
    assert main(base + ["--trials", "2", "--set", "data.source=parquet",
                        "--set", f"data.path={tmp_path / 'missing.parquet'}"]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    assert not out.exists()
    (out / "tune").mkdir(parents=True)
    assert main(base + ["--trials", "2"]) == 2
    assert "already holds a search" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["tune"]
    # a folder of other files is not a search: it is not written into
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(base[:-1] + [str(mine), "--trials", "2"]) == 2
    assert f"{mine}: holds other files, not a search" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # an --overwrite whose own options are bad removes nothing
    assert main(base + ["--trials", "9", "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["tune"]


def test_resume_refuses_a_search_whose_saved_files_changed(tmp_path, files, capsys):
    from scale_diffrec.tune.search import Settings, prepare
    config, space_file = files
    out = tmp_path / "search"
    prepare(config, [], space_file, out, Settings(trials=2, search="random"))
    resume = ["tune", "--out", str(out), "--resume"]
    for name, edit in (("base.yaml", lambda t: t.replace("epochs: 4", "epochs: 5")),
                       ("space.yaml", lambda t: t.replace("0.01", "0.02")),
                       ("settings.json", lambda t: t[:-5])):
        before = (out / name).read_text()
        assert edit(before) != before
        (out / name).write_text(edit(before))
        assert main(resume) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out / name}: ") and err.count("\n") == 1, err
        assert ("changed since the search started" in err) != (name == "settings.json"), err
        (out / name).write_text(before)


def test_random_and_optuna_searches_try_each_point_once(tmp_path):
    """Tune's random variants and TPE draw a categorical space with replacement: a repeated
    point trains the same run again. The drawn points are distinct, start points first."""
    from scale_diffrec.tune.search import DistinctOptunaSearch, _OptunaSpace, distinct_points
    import optuna
    space = load_space(_write(tmp_path / "space.yaml", {**SPACE, "start": [START]}))
    assert space.grid_size == 6
    points = distinct_points(space, 6, seed=4)
    assert points[0] == space.start[0] and len({tuple(p.items()) for p in points}) == 6
    assert distinct_points(space, 3, seed=4) == points[:3]
    assert distinct_points(space, 3, seed=5) != points[:3] or distinct_points(
        space, 3, seed=6) != points[:3]
    search = DistinctOptunaSearch(space=_OptunaSpace(space), metric="best_valid", mode="max",
                                  sampler=optuna.samplers.TPESampler(seed=0),
                                  points_to_evaluate=list(space.start))
    seen = []
    for i in range(6):
        config = search.suggest(f"t{i}")
        seen.append(tuple(sorted(config.items())))
        if i % 2:      # some trials end before the next is proposed, some are still running
            search.on_trial_complete(f"t{i - 1}", {"best_valid": 0.1 * i})
            search.on_trial_complete(f"t{i}", {"best_valid": 0.1 * i + 0.05})
    assert len(set(seen)) == 6
    assert dict(seen[0]) == space.start[0]


# ----------------------------------------------------------------------------- the hook
def test_on_epoch_sees_every_epoch_and_tune_reports_each_evaluation(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", {**TINY, "epochs": 3}))
    seen = []
    metrics = train(cfg, tmp_path / "run", on_epoch=lambda e, r: seen.append(
        (dict(e), evaluation_report(e, r))), test=False)
    assert [e["epoch"] for e, _ in seen] == [1, 2, 3]
    reports = [r for _, r in seen if r is not None]
    assert [r["epoch"] for r in reports] == [2, 3]        # eval_every 2, and the last epoch
    best = max(r["valid/recall@20"] for r in reports)
    assert reports[-1]["best_valid"] == best == metrics["valid"]["recall@20"]
    assert reports[-1]["best/recall@20"] == best
    saved = json.loads((tmp_path / "run" / runs.METRICS).read_text())
    assert "test" not in metrics and "test" not in saved
    finished = finish_best(tmp_path / "run")      # the selected trial's test, after selection
    assert finished["valid"] == metrics["valid"]
    assert json.loads((tmp_path / "run" / runs.METRICS).read_text())["test"] == finished["test"]


def test_train_log_dir_writes_losses_and_valid_metrics_for_tensorboard(tmp_path, files,
                                                                        tensorboard_scalars):
    config, _ = files
    assert main(["train", "--config", str(config), "--set", "epochs=3", "--out",
                 str(tmp_path / "run"), "--log-dir", str(tmp_path / "tb")]) == 0
    history = json.loads((tmp_path / "run" / runs.METRICS).read_text())["history"]
    tensorboard_scalars.assert_history(tmp_path / "tb", history)


def _mlflow_runs(uri: str) -> dict:
    """{run name: (run, {metric: [(step, value)]})} of the scale-diffrec experiment at uri."""
    from mlflow.tracking import MlflowClient
    from scale_diffrec.trackers import MLFLOW_EXPERIMENT
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    return {r.info.run_name: (r, {k: sorted((m.step, m.value)
                                            for m in client.get_metric_history(r.info.run_id, k))
                                  for k in r.data.metrics})
            for r in client.search_runs([experiment.experiment_id])}


def test_train_mlflow_logs_the_config_and_every_epoch(tmp_path, files):
    pytest.importorskip("mlflow")
    config, _ = files
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--config", str(config), "--set", "epochs=3", "--out",
                 str(tmp_path / "run"), "--mlflow", uri, "--log-dir", str(tmp_path / "tb")]) == 0
    history = json.loads((tmp_path / "run" / runs.METRICS).read_text())["history"]
    (run, metrics), = _mlflow_runs(uri).values()
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["model"] == "ldiffrec" and run.data.params["diffusion.steps"] == "5"
    assert metrics["train/loss"] == [(h["epoch"], pytest.approx(h["loss"])) for h in history]
    assert metrics["valid/recall_20"] == [(h["epoch"], pytest.approx(h["valid"]["recall@20"]))
                                          for h in history if "valid" in h]
    assert (tmp_path / "tb").is_dir()             # both trackers at once
    # resumed: the same MLflow run goes on (its parameters are the first config's)
    assert main(["train", "--config", str(config), "--set", "epochs=5", "--out",
                 str(tmp_path / "run"), "--mlflow", uri, "--resume"]) == 0
    history = json.loads((tmp_path / "run" / runs.METRICS).read_text())["history"]
    (run, metrics), = _mlflow_runs(uri).values()
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
    assert metrics["train/loss"] == [(h["epoch"], pytest.approx(h["loss"])) for h in history]
    assert [step for step, _ in metrics["train/loss"]] == [1, 2, 3, 4, 5]


def test_a_log_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, files, capsys):
    config, _ = files
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--log-dir", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --log-dir {a_file}: is a file, not a folder\n"
    assert not (tmp_path / "run").exists() and a_file.read_text() == ""


def test_a_trial_the_scheduler_cuts_ends_its_mlflow_run(tmp_path, monkeypatch):
    """Tune stops a cut trial's process, so its MLflowLog never closes: the driver's
    callback ends the run, tagged with the epoch; other trials' runs are left alone."""
    pytest.importorskip("mlflow")
    from scale_diffrec.trackers import STOPPED_TAG, MLflowLog
    from scale_diffrec.tune.progress import SearchProgress
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    progress = SearchProgress("best_valid", mlflow=uri)
    monkeypatch.setattr(SearchProgress, "runs_dir", tmp_path / "runs")
    entry = {"epoch": 1, "loss": 1.0, "seconds": 0.1}
    names = ("cut", "running", "ended", "cut-before-its-first-epoch", "stopped-at-its-last")
    for name in names:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / runs.CONFIG).write_text("epochs: 3\n")
    for name in ("cut", "running", "ended", "stopped-at-its-last"):
        tracker = MLflowLog(uri, name, {"lr": 0.1}, tmp_path / "runs" / name)
        tracker(entry, {})
        if name == "ended":
            tracker.close()                           # ended by itself
    for name, result in (("cut", {"done": True, "epoch": 2}), ("running", {"epoch": 2}),
                         ("cut-before-its-first-epoch", {"done": True, "epoch": 1}),
                         ("stopped-at-its-last", {"done": True, "epoch": 3})):
        trial = SimpleNamespace(trial_id=name)
        progress.on_trial_result(0, [], trial, result)
        progress.on_trial_complete(0, [], trial)
    got = {name: (run.info.status, run.data.tags.get(STOPPED_TAG))
           for name, (run, _) in _mlflow_runs(uri).items()}
    assert got == {"cut": ("FINISHED", "2"), "running": ("RUNNING", None),
                   "ended": ("FINISHED", None), "stopped-at-its-last": ("FINISHED", None)}
    assert [ended_state(tmp_path / "runs" / n) for n in names] == [
        "stopped early", "unfinished", "unfinished", "stopped early", "done"]


def test_a_relative_sqlite_uri_is_the_callers_file(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from scale_diffrec.trackers import check_mlflow
    monkeypatch.chdir(tmp_path)
    assert check_mlflow("sqlite:///sub/../m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert check_mlflow(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"


def test_an_mlflow_uri_that_does_not_answer_is_one_error_line_before_anything(tmp_path, files,
                                                                              capsys):
    pytest.importorskip("mlflow")
    config, space_file = files
    for command in (["train", "--config", str(config), "--out", str(tmp_path / "run")],
                    ["tune", "--config", str(config), "--space", str(space_file), "--trials",
                     "1", "--out", str(tmp_path / "search")]):
        for uri, words in (("nosuch://x", "nosuch://x: the tracking store does not answer"),
                           ("", "needs a tracking URI"),
                           ("sqlite:///", "sqlite:///: an in-memory database keeps nothing"),
                           ("sqlite://", "sqlite://: an in-memory database keeps nothing"),
                           ("sqlite:////proc/m.db", "/proc/m.db: cannot write in /proc"),
                           (f"sqlite:///{tmp_path}", f"{tmp_path}: is a folder")):
            assert main(command + ["--mlflow", uri]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --mlflow {words}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "tiny.yaml"]


def _log_one_epoch(rank, world, log_dir):
    """Every rank calls the hook, as a W-worker run's ranks do; rank r's loss is r + 1."""
    from scale_diffrec.trackers import TensorBoardLog
    board = TensorBoardLog(log_dir)
    board({"epoch": 1, "loss": rank + 1.0, "seconds": 0.5, "valid": {"recall@20": 0.25}},
          {"best": 0.25})
    board.close()


def test_log_dir_is_written_by_rank_0_only(tmp_path, tensorboard_scalars):
    from scale_diffrec.train.distributed.local import run_distributed
    run_distributed(_log_one_epoch, 2, args=(str(tmp_path / "tb"),), timeout=120)
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 1.0)]
    assert scalars["valid/recall_20"] == [(1, 0.25)] and scalars["valid/best"] == [(1, 0.25)]


# ----------------------------------------------------------------------------- progress
def test_progress_line_counts_trials_by_state(tmp_path):
    def trial(tid, status, best=None):
        return SimpleNamespace(trial_id=tid, status=status,
                               last_result={} if best is None else {"best_valid": best})
    for name, marker in (("a", runs.METRICS), ("b", STOPPED)):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text('{"epoch": 2}')
        (tmp_path / name / runs.CONFIG).write_text("epochs: 4\n")
    trials = [trial("a", "TERMINATED", 0.2), trial("b", "TERMINATED", 0.1),
              trial("c", "RUNNING", 0.3), trial("d", "PENDING"), trial("e", "ERROR")]
    line = summary_line(trials, tmp_path, "best_valid", elapsed=90.0, total=8)
    assert line.startswith("tune: 1 running, 1 pending, 1 done, 1 stopped early, 1 failed "
                           "of 8 | best best_valid 0.3000 (trial c)")
    assert "| best valid recall@20 0.3000 (trial c) |" in summary_line(
        trials, tmp_path, "best_valid", 90.0, 8, shown="valid recall@20")
    assert line.endswith("elapsed 1m30s | ETA 2m30s")    # 30 s per ended trial, 5 to go
    assert summary_line(trials[3:4], tmp_path, "best_valid", 5.0, None).endswith(
        "no best_valid yet | elapsed 0m05s | ETA ?")


def test_reports_outlive_a_resume_for_the_wall_seconds_and_the_plot(tmp_path, monkeypatch):
    """Tune's progress.csv of a restored trial starts again (its time_total_s at 0, its
    columns from its first result: a trial resumed at an epoch without an evaluation and cut
    there has no valid column); the driver's own REPORTS file keeps every result."""
    from scale_diffrec.tune.progress import REPORTS, SearchProgress
    from scale_diffrec.tune.results import plot, reports, wall_seconds
    progress = SearchProgress("best_valid")
    monkeypatch.setattr(SearchProgress, "runs_dir", tmp_path / "runs")
    a, b = (SimpleNamespace(trial_id=t) for t in "ab")
    for trial, result in ((a, {"epoch": 2, "time_total_s": 2.0, "valid/recall@20": 0.1}),
                          (a, {"epoch": 4, "time_total_s": 4.0, "valid/recall@20": 0.2}),
                          # the driver stopped; a restored trial's time starts again
                          (a, {"epoch": 4, "time_total_s": 1.0, "valid/recall@20": 0.2}),
                          (a, {"epoch": 6, "time_total_s": 3.0, "valid/recall@20": 0.3}),
                          (b, {"epoch": 11, "time_total_s": 0.5, "done": True})):
        progress.on_trial_result(0, [], trial, {**result, "timestamp": 100 + result["epoch"],
                                                "trial_id": trial.trial_id, "loss": 1.0})
    frame = reports(tmp_path / "runs" / "a")
    assert list(frame["epoch"]) == [2, 4, 4, 6] and "loss" not in frame
    assert wall_seconds(frame) == 4.0 + 3.0
    assert wall_seconds(reports(tmp_path / "runs" / "b")) == 0.5
    assert wall_seconds(reports(tmp_path / "runs" / "none")) is None
    assert (tmp_path / "runs" / "b" / STOPPED).is_file()
    assert (tmp_path / "runs" / "a" / REPORTS).is_file()
    table = pd.DataFrame({"trial": ["a", "b"], "state": ["done", "stopped early"],
                          "best_valid": [0.3, None],
                          "run_dir": [str(tmp_path / "runs" / t) for t in "ab"]})
    assert plot(table, "recall@20", tmp_path).stat().st_size > 0


# ----------------------------------------------------------------------------- Ray
def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _has_mlflow() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def _history_epochs(run_dir: Path) -> list[int]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    return [h["epoch"] for h in state["record"]["history"]]


@pytest.mark.ray
def test_search_interrupted_and_resumed_selects_the_best_valid_trial(ray_local, tmp_path, files,
                                                                     capsys):
    config, space_file = files
    # enough epochs that the driver is stopped mid-trial on an idle machine too (a tiny
    # epoch takes milliseconds)
    _write(config, {**TINY, "epochs": 40})
    # the first trial is this point (one seed 1's random draws do not repeat: a repeated
    # point ties, and the test's winner must be one trial)
    _write(space_file, {**SPACE, "start": [FIRST]})
    out = tmp_path / "search"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "scale_diffrec", "tune", "--out", str(out), "--address",
           address]
    mlflow = (f"sqlite:///{tmp_path / 'mlflow.db'}",) if _has_mlflow() else ()
    first = subprocess.Popen(cmd + ["--config", str(config), "--space", str(space_file),
                                    "--trials", "3", "--seed", "1", "--max-concurrent", "1",
                                    *(("--mlflow",) + mlflow if mlflow else ())],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        # stop the driver while a trial is between epochs (a last.pt, no metrics.json yet)
        def mid_trial():
            return any((d / "checkpoints" / "last.pt").is_file()
                       and not (d / runs.METRICS).exists()
                       for d in (out / "runs").glob("*"))
        _wait(mid_trial, 300, "a trial's first epoch")
        first.send_signal(signal.SIGTERM)      # as Ctrl-C (SIGINT), which it is turned into
        log, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, log
    assert log.strip().splitlines()[-1] == (f"interrupted: continue the search with "
                                            f"`scale-diffrec tune --out {out} --resume`"), log
    assert not (out / "tune.json").exists()
    interrupted = {d.name: len(_history_epochs(d)) for d in (out / "runs").glob("*")
                   if not (d / runs.METRICS).exists()}
    assert interrupted, log

    # moved, the search resumes where it lies now (and writes nothing where it was)
    started_in, out = out, tmp_path / "moved search"
    started_in.rename(out)
    cmd[cmd.index("--out") + 1] = str(out)
    second = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                            timeout=600)
    (tmp_path / "resume.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout + second.stderr
    assert not started_in.exists()
    printed = json.loads(second.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "tune.json").read_text())
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == summary["trials"] == 3
    assert sorted(table["trial"]) == sorted(p.name for p in (out / "runs").iterdir())
    assert (out / "trials.png").stat().st_size > 0
    assert list(pd.read_parquet(out / "trials.parquet")["trial"]) == list(table["trial"])

    # every trial's best valid, read from its own run directory
    best_of = {}
    for run_dir in (out / "runs").iterdir():
        epochs = _history_epochs(run_dir)
        assert epochs == list(range(1, len(epochs) + 1)), (run_dir.name, epochs)  # resumed
        best_of[run_dir.name] = torch.load(run_dir / "checkpoints" / "best.pt",
                                           weights_only=False)["record"]["best"]
        row = table[table["trial"] == run_dir.name].iloc[0]
        assert row["best_valid"] == pytest.approx(best_of[run_dir.name], rel=1e-9)
    for name, done_epochs in interrupted.items():     # continued from their last.pt
        assert (f"resumed from {out / 'runs' / name / 'checkpoints' / 'last.pt'} at epoch "
                f"{done_epochs}") in second.stdout, second.stdout
    winner = max(best_of, key=best_of.get)
    assert summary["best"]["trial"] == printed["best"]["trial"] == winner
    assert table.iloc[0]["trial"] == winner
    assert (out / "best").resolve() == (out / "runs" / winner).resolve()
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg == load_config(out / "runs" / winner / "config.yaml")
    for key, value in summary["best"]["params"].items():
        section, _, leaf = key.rpartition(".")
        assert (best_cfg[section][leaf] if section else best_cfg[leaf]) == value
    assert best_cfg["diffusion"]["noise_min"] < best_cfg["diffusion"]["noise_max"]
    first_trial = load_config(out / "runs" / min(table["trial"], key=lambda t: t[-5:])
                              / "config.yaml")
    assert (first_trial["lr"], first_trial["diffusion"]["noise_min"],
            first_trial["diffusion"]["noise_max"]) == (1.0e-4, 5.0e-4, 5.0e-3)
    assert load_space(out / "space.yaml").start == load_space(space_file).start

    assert set(table["state"]) <= {"done", "stopped early"}
    for trial, state in zip(table["trial"], table["state"]):    # cut by ASHA: no metrics.json
        run_dir = out / "runs" / trial
        assert state == ended_state(run_dir)
        assert (state == "stopped early") <= (run_dir / STOPPED).is_file()
        assert (run_dir / runs.METRICS).is_file() <= (state == "done")
        assert (state == "done") == (len(_history_epochs(run_dir)) == 40 or
                                     (run_dir / runs.METRICS).is_file())

    # test metrics only for the selected trial; its run directory works with evaluate
    for run_dir in (out / "runs").iterdir():
        if (run_dir / runs.METRICS).exists():
            has_test = "test" in json.loads((run_dir / runs.METRICS).read_text())
            assert has_test == (run_dir.name == winner)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out / "best"), "--split", "valid"]) == 0
    valid = json.loads(capsys.readouterr().out)
    assert valid["recall@20"] == pytest.approx(best_of[winner], abs=1e-12)
    assert valid["recall@20"] == pytest.approx(summary["best"]["valid"]["recall@20"], abs=1e-12)
    if mlflow:       # every trial's MLflow run ended FINISHED, a cut one tagged with its epoch
        from scale_diffrec.trackers import STOPPED_TAG
        from mlflow.tracking import MlflowClient
        client = MlflowClient(mlflow[0])
        newest = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    order_by=["attributes.start_time ASC"])
        # each trial's newest run (one moved in the middle of its run starts another there)
        logged = {run.info.run_name: (run.info.status, STOPPED_TAG in run.data.tags)
                  for run in newest}
        assert logged == {t: ("FINISHED", state == "stopped early")
                          for t, state in zip(table["trial"], table["state"])}, logged


@pytest.mark.ray
def test_a_trial_can_be_a_two_worker_run(ray_local, tmp_path, files, capsys):
    config, space_file = files
    # eval_every 2: rank 0 reports epoch 1 to Ray Train without a valid metric, which Tune
    # must not see (it refuses a result without best_valid)
    _write(config, {**TINY, "epochs": 3, "eval_every": 2})
    _write(space_file, {"search": "grid", "scheduler": None, "params": {"lr": [1.0e-3]}})
    out = tmp_path / "search"
    mlflow = pytest.importorskip("mlflow") and f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["tune", "--config", str(config), "--space", str(space_file), "--out",
                 str(out), "--workers-per-trial", "2", "--mlflow", mlflow]) == 0
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["done"] and list(table["epochs"]) == [3]
    metrics = json.loads((out / "best" / runs.METRICS).read_text())
    (run, logged), = _mlflow_runs(mlflow).values()       # rank 0 of the trial's workers
    assert run.info.run_name == table["trial"][0] and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001"
    assert logged["valid/recall_20"] == [(h["epoch"], pytest.approx(h["valid"]["recall@20"]))
                                         for h in metrics["history"] if "valid" in h]
    assert metrics["distributed"]["workers"] == 2 and "test" in metrics
    assert table["best_valid"][0] == pytest.approx(metrics["valid"]["recall@20"], abs=1e-12)
    progress = pd.read_csv(next((out / "tune").glob("*/progress.csv")))
    assert list(progress["epoch"]) == [2, 3]   # rank 0's reports from its first evaluation
    assert progress["best_valid"].iloc[-1] == pytest.approx(table["best_valid"][0])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out / "best"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["recall@20"] == pytest.approx(
        metrics["test"]["recall@20"], abs=1e-12)


@pytest.mark.ray
def test_a_diffurec_trial_on_the_paper_space_runs_end_to_end(ray_local, tmp_path, capsys):
    """DiffuRec selects on hr@10: Tune gets it at every evaluation, the table, plot and
    summary use it; the paper space's ASHA grace period (40 epochs) exceeds the quickstart's
    3 epochs, so the trial runs out."""
    out = tmp_path / "search"
    assert main(["tune", "--config", str(REPO / "configs" / "diffurec-quickstart.yaml"),
                 "--space", str(REPO / "configs" / "tune" / "paper-diffurec.yaml"),
                 "--search", "random", "--trials", "1", "--seed", "0", "--out",
                 str(out)]) == 0
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["done"] and list(table["epochs"]) == [3]
    summary = json.loads((out / "tune.json").read_text())
    assert summary["metric"] == "valid hr@10" and (out / "trials.png").stat().st_size > 0
    metrics = json.loads((out / "best" / runs.METRICS).read_text())
    assert metrics["model"] == "diffurec" and "test" in metrics
    assert table["best_valid"][0] == pytest.approx(metrics["valid"]["hr@10"], abs=1e-12)
    progress = pd.read_csv(next((out / "tune").glob("*/progress.csv")))
    assert progress["valid/hr@10"].max() == pytest.approx(metrics["valid"]["hr@10"])
    assert load_config(out / "best.yaml")["model"] == "diffurec"


def test_workers_per_trial_beyond_a_choice_of_clusters_is_refused(tmp_path, files, capsys):
    config, space_file = files
    _write(space_file, {"params": {"ldiffrec.n_clusters": [2, 3]}})
    out = tmp_path / "search"
    assert main(["tune", "--config", str(config), "--space", str(space_file), "--out",
                 str(out), "--trials", "2", "--workers-per-trial", "3"]) == 2
    assert "ldiffrec.n_clusters is 2" in capsys.readouterr().err     # the base config's
    assert main(["tune", "--config", str(config), "--space", str(space_file), "--out",
                 str(out), "--trials", "2", "--workers-per-trial", "3",
                 "--set", "ldiffrec.n_clusters=3"]) == 2
    err = capsys.readouterr().err
    assert "params 'ldiffrec.n_clusters' choice 2" in err and "distributed.workers" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- shipped spaces
SHIPPED = {"quickstart.yaml": "quickstart.yaml", "paper-diffrec.yaml": "ml1m-clean-diffrec.yaml",
           "paper-ldiffrec.yaml": "ml1m-noisy-ldiffrec.yaml",
           "paper-multvae.yaml": "ml1m-clean-multvae.yaml",
           "paper-tdiffrec.yaml": "synthetic-tdiffrec.yaml",
           "paper-ltdiffrec.yaml": "synthetic-ltdiffrec.yaml",
           "paper-diffurec.yaml": "diffurec-beauty.yaml",
           **{f"ml1m-{split}-{model}.yaml": f"ml1m-{split}-{model}.yaml"
              for split in ("clean", "noisy") for model in ("diffrec", "ldiffrec")}}


def test_every_shipped_space_loads_and_lists_no_impossible_combination():
    assert sorted(p.name for p in (REPO / "configs" / "tune").glob("*.yaml")) == sorted(SHIPPED)
    for name, base in SHIPPED.items():
        space = load_space(REPO / "configs" / "tune" / name)
        space.check(REPO / "configs" / base)
        for param in space.params:
            for choice in param.choices:
                values = dict(zip(param.keys, choice))
                if "diffusion.noise_max" in values:
                    assert values["diffusion.noise_min"] < values["diffusion.noise_max"], name
                if "diffusion.sampling_steps" in values:
                    steps = values["diffusion.steps"]
                    assert values["diffusion.sampling_steps"] in (0, steps // 4, steps // 2)
    paper = load_space(REPO / "configs" / "tune" / "paper-ldiffrec.yaml")
    assert paper.grid_size == 4 * 3 * 17 * 5 * 5 * 5     # 5 noise scales: 0 is refused


@pytest.mark.parametrize("row", [f"ml1m-{split}-{model}" for split in ("clean", "noisy")
                                 for model in ("diffrec", "ldiffrec")])
def test_each_row_space_searches_inside_the_papers_grid(row):
    """The tuned rows are 'within the paper's published search space': a row's space names
    the same parameters as the paper's grid, each with a subset of its values."""
    space = load_space(REPO / "configs" / "tune" / f"{row}.yaml")
    paper = load_space(REPO / "configs" / "tune" / f"paper-{row.split('-')[-1]}.yaml")
    assert [p.keys for p in space.params] == [p.keys for p in paper.params]
    for mine, theirs in zip(space.params, paper.params):
        assert all(choice in theirs.choices for choice in mine.choices), mine.keys


def test_the_diffurec_space_holds_every_valid_steps_and_schedule_pair_and_no_other():
    from scale_diffrec.errors import ConfigError
    space = load_space(REPO / "configs" / "tune" / "paper-diffurec.yaml")
    space.check(REPO / "configs" / "diffurec-quickstart.yaml")   # what tune runs it on below
    assert space.grid_size == 4 * 14 * 3 * 2 * 3 * 2
    (pairs,) = [p for p in space.params if p.name == "diffurec.steps,diffurec.schedule"]
    beauty = REPO / "configs" / "diffurec-beauty.yaml"
    for steps in {s for s, _ in pairs.choices}:
        for schedule in ("trunc_lin", "linear", "cosine", "sqrt"):     # paper Table 3
            try:
                load_config(beauty, [f"diffurec.steps={steps}",
                                     f"diffurec.schedule={schedule}"])
                valid = True
            except ConfigError:
                valid = False
            assert ((steps, schedule) in pairs.choices) == valid, (steps, schedule)
    assert pairs.choices[0] == (32, "trunc_lin")                  # the released setting


@pytest.mark.parametrize("grace, epochs, asha, said", [
    (2, 40, True, None), (40, 40, False, "scheduler.grace_period 40 is not below"),
    (40, 3, False, "scheduler.grace_period 40"),
    (None, 5, False, "the grace period (default: eval_every) 5 is not below")])
def test_asha_runs_only_when_the_runs_are_longer_than_its_grace_period(grace, epochs, asha,
                                                                       said, caplog):
    from scale_diffrec.tune.search import _scheduler
    space = load_space(REPO / "configs" / "tune" / "paper-diffurec.yaml")
    space = dataclasses.replace(space, scheduler={} if grace is None else
                                {"grace_period": grace})
    with caplog.at_level("INFO", logger="scale_diffrec"):
        scheduler = _scheduler(space, {"epochs": epochs, "eval_every": 5})
    assert (scheduler is not None) == asha
    assert (said is None) == ("no trial is stopped early" not in caplog.text)
    assert said is None or said in caplog.text


def test_the_committed_selected_configs_load_and_lie_in_their_search_space():
    """benchmarks/results/tune/ROW/best.yaml (reproduce.py --tuned benchmarks/results/tune):
    each is a valid config whose searched values are one of its space's points."""
    found = sorted((REPO / "benchmarks" / "results" / "tune").glob("*/best.yaml"))
    assert found
    for path in found:
        cfg = load_config(path)
        space = load_space(path.parent / "space.yaml")
        chosen = {p.name: p.label(tuple(_value(cfg, k) for k in p.keys)) for p in space.params}
        for p in space.params:
            assert chosen[p.name] in p.labels, (path, p.name)
        assert json.loads((path.parent / "tune.json").read_text())["best"]["params"] == {
            k: _value(cfg, k) for p in space.params for k in p.keys}


def _value(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg
