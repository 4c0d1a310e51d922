"""Run files: sealed checkpoints (every kind of damage is one line naming the file), a full
disk as one line with the previous file intact, modes that follow the user's umask."""
import errno
import os
import stat

import numpy as np
import pytest
import torch

from scale_diffrec import files, runs
from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.errors import DataError, NoSpaceError
from scale_diffrec.train import train

TINY = ["data.source=synthetic", "data.synthetic.n_users=60", "data.synthetic.n_items=40",
        "data.synthetic.n_clusters=2", "data.synthetic.mean_items_per_user=8",
        "batch_size=30", "epochs=1", "topk=[10, 20]", "model=multvae", "multvae.dims=[4, 8]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(None, TINY), out)
    return out


def damages(good: bytes) -> dict:
    """Ways a checkpoint goes bad, each with the message that must name it."""
    rng = np.random.default_rng(0)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    return {"empty": (b"", "no checksum seal"),
            "truncated": (good[: len(good) // 2], "no checksum seal"),
            "cut seal": (good[:-3], "no checksum seal"),
            "random bytes": (rng.bytes(len(good)), "no checksum seal"),
            "flipped byte": (bytes(flipped), "checksum mismatch"),
            "unsealed torch file": (good[: good.rindex(files.SEAL)], "no checksum seal")}


def test_checkpoints_round_trip_sealed(tmp_path):
    state = {"model": {"w": torch.arange(5.0)}, "epoch": 3}
    runs.save_checkpoint(tmp_path, "last", state)
    path = runs.checkpoint_path(tmp_path, "last")
    payload, digest = path.read_bytes().rsplit(files.SEAL, 1)
    assert digest.decode() == files.sha256(path, len(payload))
    got = runs.load_checkpoint(tmp_path, "last")
    assert got["epoch"] == 3 and torch.equal(got["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize("command", ["evaluate", "export", "resume"])
def test_damaged_checkpoints_are_one_line_errors_naming_the_file(run_dir, tmp_path, capsys,
                                                                 command):
    name = "last" if command == "resume" else "best"
    path = runs.checkpoint_path(run_dir, name)
    good, config = path.read_bytes(), (run_dir / "config.yaml").read_bytes()
    argv = {"evaluate": ["evaluate", "--run", str(run_dir)],
            "export": ["export", "--run", str(run_dir), "--out", str(tmp_path / "bundle")],
            "resume": ["train", "--config", str(run_dir / "config.yaml"), "--out",
                       str(run_dir), "--resume", "--set", "epochs=2"]}[command]
    try:
        for what, (data, message) in damages(good).items():
            path.write_bytes(data)
            capsys.readouterr()
            assert main(argv) == 2, what
            err = capsys.readouterr().err
            assert err == f"error: {path}: {err.split(': ', 2)[2]}", what
            assert message in err and err.count("\n") == 1, (what, err)
            assert path.read_bytes() == data, what           # nothing written over it
            assert (run_dir / "config.yaml").read_bytes() == config, what
            assert not (tmp_path / "bundle").exists()
    finally:
        path.write_bytes(good)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line(tmp_path):
    runs.save_checkpoint(tmp_path, "best", {"model": {"nonsense": torch.zeros(2)}})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(DataError, match=r"best.pt: the saved weights do not fit") as err:
        runs.load_model_state(model, runs.load_checkpoint(tmp_path, "best")["model"],
                              runs.checkpoint_path(tmp_path, "best"))
    assert "\n" not in str(err.value)


def no_space_after(n_bytes: int):
    """A torch.save that writes ``n_bytes`` and then finds the disk full."""
    def save(obj, f):
        f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(run_dir, monkeypatch, capsys):
    path = runs.checkpoint_path(run_dir, "last")
    before = path.read_bytes()
    monkeypatch.setattr(runs.torch, "save", no_space_after(1000))
    with pytest.raises(NoSpaceError) as err:
        runs.save_checkpoint(run_dir, "last", {"model": {}})
    assert str(err.value) == f"no space left on {path}"
    assert main(["train", "--config", str(run_dir / "config.yaml"), "--out", str(run_dir),
                 "--resume", "--set", "epochs=2"]) == 2
    assert capsys.readouterr().err.endswith(f"error: no space left on {path}\n")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt", "last.pt"]


def test_full_disk_during_an_export_keeps_the_previous_bundle(run_dir, tmp_path, monkeypatch,
                                                             capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import scale_diffrec.retrieval.bundle as bundle

    def full(path, array):
        with open(path, "wb") as f:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(bundle.np, "save", full)
    capsys.readouterr()
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: no space left on {out}\n"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_other_write_errors_are_one_line_and_clean_up(tmp_path, capsys):
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("partial")
        raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(DataError, match=r"x.json: cannot write: Input/output error$"):
        files.atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["x.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"y.json: cannot write: File exists \(.*file\)$"):
        files.atomic_write(tmp_path / "file" / "y.json", lambda tmp: tmp.write_text("{}"))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_run_files_and_bundles_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        train(load_config(None, TINY + ["model=ldiffrec", "ldiffrec.n_clusters=2",
                                        "ldiffrec.in_dims=[6]", "ldiffrec.mlp_dims=[4]",
                                        "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=3"]), out)
        from scale_diffrec.retrieval import export
        bundle = export(runs.load_run(out), tmp_path / "bundle")
        paths = [p for root in (out, bundle) for p in root.rglob("*")]
    finally:
        os.umask(old)
    assert {"config.yaml", "metrics.json", "partition.parquet", "best.pt", "last.pt",
            "CURRENT", "manifest.json", "query_tower.pt"} <= {p.name for p in paths}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_full_device_is_no_space_left():
    """torch's writer passes Python's ENOSPC through (no traceback of its own)."""
    with pytest.raises(NoSpaceError, match="^no space left on /dev/full$"):
        with files.write_errors("/dev/full"):
            files.write_sealed("/dev/full", lambda f: torch.save({"w": torch.zeros(10 ** 5)}, f))
