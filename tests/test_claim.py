"""Output directories claimed by one writer (``claim``), and the command line's other field
failures: an unwritable --out, Ctrl-C, a resume below the trained epochs. Each ends with
one line and a status (2, or 130 for Ctrl-C) before anything is written."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scale_diffrec import runs
from scale_diffrec.claim import LOCK, claim
from scale_diffrec.cli import main
from scale_diffrec.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=multvae", "data.source=synthetic", "data.synthetic.n_users=60",
        "data.synthetic.n_items=40", "data.synthetic.n_clusters=2",
        "data.synthetic.mean_items_per_user=8", "batch_size=30", "topk=[10, 20]",
        "multvae.dims=[4, 8]", "eval_every=1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HOLD = ("import sys, time\nfrom scale_diffrec.claim import claim\n"
        "with claim(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def _train_argv(out, *sets, flags=()):
    argv = ["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out),
            *flags]
    for item in [*TINY, *sets]:
        argv += ["--set", item]
    return argv


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(folder: Path) -> dict:
    """The run's files (a holder's lock file aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != LOCK}


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    from scale_diffrec.progress import log
    log.handlers.clear()
    yield
    log.handlers.clear()


@pytest.fixture
def held(tmp_path):
    """hold(path): another process holds the claim on ``path`` until the test ends."""
    procs = []

    def hold(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=ENV,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- the claim
def test_a_claim_is_exclusive_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with claim(out):
        assert [p.name for p in out.iterdir()] == [LOCK]
        assert (out / LOCK).read_text().split()[0] == str(os.getpid())
        with pytest.raises(ConfigError, match=rf"^{out} is in use by another run "
                                              rf"\(pid {os.getpid()}\)$"):
            with claim(out):
                pass
        with pytest.raises(ConfigError, match="in use"):
            with claim(out, shared=True):     # an export under a run
                pass
    assert list(tmp_path.iterdir()) == []     # the lock file and the folders it made: gone
    with claim(out, shared=True), claim(out, shared=True):      # concurrent exports
        with pytest.raises(ConfigError, match="in use"):
            with claim(out):
                pass
    assert list(tmp_path.iterdir()) == []
    with claim(out):                          # what the block wrote stays
        (out / "config.yaml").write_text("seed: 0\n")
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    (tmp_path / "empty").mkdir()              # a folder the claim did not make stays
    with claim(tmp_path / "empty"):
        pass
    assert (tmp_path / "empty").is_dir()


def test_a_lock_held_by_another_process_refuses_every_writer_and_a_kill_frees_it(
        tmp_path, capsys, held):
    assert main(_train_argv(tmp_path / "run", "epochs=1")) == 0
    before = _files(tmp_path / "run")
    holder = held(tmp_path / "run")
    message = f"error: {tmp_path / 'run'} is in use by another run (pid {holder.pid})"
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert main(_train_argv(tmp_path / "run", "epochs=2", flags=flags)) == 2
        assert _error(capsys) == message
        assert _files(tmp_path / "run") == before
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "run")]) == 2
    assert _error(capsys) == message
    (tmp_path / "log.csv").write_text("user_id,item_id\n1,2\n")
    for argv in (["prepare", "--input", str(tmp_path / "log.csv"), "--out"],
                 ["tune", "--config", str(tmp_path / "log.csv"), "--space",
                  str(tmp_path / "log.csv"), "--out"]):
        holder_of_other = held(tmp_path / argv[0])
        assert main([*argv, str(tmp_path / argv[0])]) == 2
        assert _error(capsys) == (f"error: {tmp_path / argv[0]} is in use by another run "
                                  f"(pid {holder_of_other.pid})")
        assert [p.name for p in (tmp_path / argv[0]).iterdir()] == [LOCK]   # the holder's
    holder.kill()                             # a killed holder leaves its lock file...
    holder.wait()
    assert (tmp_path / "run" / LOCK).exists()
    assert main(_train_argv(tmp_path / "run", "epochs=2", flags=["--resume"])) == 0
    assert not (tmp_path / "run" / LOCK).exists()         # ...which never blocks anyone


def test_two_trains_started_together_on_one_new_directory_do_not_both_run(tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "scale_diffrec",
                               *_train_argv(out, "epochs=3", f"seed={seed}")], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (winner, _), = [(seed, err) for seed, (rc, err) in zip((1, 2), results) if rc == 0]
    _, err = next(r for r in results if r[0] == 2)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    # the second either found the first at work or, started after it ended, its run
    assert len(lines) == 1 and (f"{out} is in use by another run (pid " in lines[0]
                                or "already holds a run" in lines[0]), err
    assert f"seed: {winner}\n" in (out / runs.CONFIG).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------ an unwritable --out
@pytest.mark.parametrize("command",
                         ["train", "train --log-dir", "prepare", "tune", "export"])
@pytest.mark.parametrize("where", ["/proc/scale_diffrec_run", "FILE/run"])
def test_an_out_that_cannot_be_created_is_one_line_before_any_work(tmp_path, capsys, command,
                                                                    where):
    (tmp_path / "FILE").write_text("a file, not a folder\n")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    missing = tmp_path / "missing.yaml"       # the data or run: would fail if they were read
    train = ["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--set",
             "data.source=parquet", "--set", f"data.path={missing}"]
    argv = {"train": [*train, "--out", out],
            "train --log-dir": [*train, "--out", str(tmp_path / "run"), "--log-dir", out],
            "prepare": ["prepare", "--input", str(missing), "--out", out],
            "tune": ["tune", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                     "--space", str(missing), "--out", out],
            "export": ["export", "--run", str(missing), "--out", out]}[command]
    assert main(argv) == 2
    line = _error(capsys)
    assert line.startswith(f"error: cannot create {out}: "), line
    assert "missing" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


# ---------------------------------------------------------------------------- Ctrl-C
def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stop, preexec", [
    (signal.SIGINT, None),
    # SIGTERM (timeout, Slurm, Kubernetes) as Ctrl-C, also in a background job (nohup, &),
    # whose SIGINT is ignored
    (signal.SIGTERM, _ignore_sigint)], ids=["sigint", "sigterm-in-background"])
def test_ctrl_c_is_one_line_exit_130_and_the_run_resumes(tmp_path, capsys, stop, preexec):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scale_diffrec",
                             *_train_argv(out, "epochs=100000", "patience=100000")],
                            env=ENV, preexec_fn=preexec,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                  # progress lines: epoch 1 is saved by now
        if " epoch 2/" in line:
            break
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"interrupted: run directory {out} is resumable "
                                        f"with --resume"], err
    assert not (out / LOCK).exists()
    trained = runs.load_checkpoint(out, "last")["epoch"]
    assert trained >= 1
    assert main(_train_argv(out, f"epochs={trained + 1}", "patience=100000",
                            flags=["--resume"])) == 0
    assert runs.load_checkpoint(out, "last")["epoch"] == trained + 1


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_ctrl_c_before_anything_is_written_says_so(tmp_path, capsys, monkeypatch, command):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("scale_diffrec.train.run.load_data", interrupt)
    monkeypatch.setattr("scale_diffrec.data.prepare.open_log", interrupt)
    out = tmp_path / "out"
    argv = {"train": _train_argv(out, "epochs=1"),
            "prepare": ["prepare", "--input", str(tmp_path / "log.csv"), "--out", str(out)]}
    assert main(argv[command]) == 130
    said = {"train": f"interrupted: nothing was written to {out}",
            "prepare": f"interrupted: prepare writes {out} whole or not at all"}[command]
    assert capsys.readouterr().err.strip().splitlines() == [said]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------- resume keeps config.yaml true
LDIFFREC = ["model=ldiffrec", "ldiffrec.n_clusters=2", "ldiffrec.in_dims=[8]",
            "ldiffrec.mlp_dims=[8]", "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=4"]


def test_resume_below_the_trained_epochs_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(out, "epochs=3", *LDIFFREC)) == 0
    before = _files(out)
    for flags in (["--resume"], ["--resume", "--workers", "2"]):   # 1 process, Ray's driver
        assert main(_train_argv(out, "epochs=1", *LDIFFREC, flags=flags)) == 2
        assert _error(capsys) == f"error: epochs=1 is below the 3 epochs already trained in {out}"
        assert _files(out) == before
    out = tmp_path / "multvae"
    assert main(_train_argv(out, "epochs=3")) == 0
    # the other keys a resume may change keep the checkpoints' meaning; equal epochs is
    # nothing to train, and config.yaml says what the checkpoints hold
    assert main(_train_argv(out, "epochs=3", "patience=2", "eval_every=2",
                            flags=["--resume"])) == 0
    saved = (out / runs.CONFIG).read_text()
    assert "epochs: 3\n" in saved and "patience: 2\n" in saved
    assert runs.load_checkpoint(out, "last")["epoch"] == 3
