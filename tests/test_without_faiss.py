"""Without the faiss extra (``pip install -e .``): training and evaluation work; export,
recommend and L-DiffRec's k-means say in one line which extra to install.

Runs in a fresh interpreter where ``import faiss`` fails (``sys.modules['faiss'] = None``),
so that no module imported earlier by the test session hides a top-level faiss import."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.source=synthetic", "data.synthetic.n_users=40", "data.synthetic.n_items=30",
        "batch_size=20", "epochs=1", "topk=[10, 20]", "model=multvae", "multvae.dims=[4, 8]"]

SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    sys.modules["faiss"] = None                  # import faiss -> ImportError
    from scale_diffrec.cli import main
    out = {}
    for name, argv in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        out[name] = [code, err.getvalue()]
    out["faiss imported"] = sys.modules.get("faiss") is not None
    print(json.dumps(out))
""")


def test_train_and_evaluate_without_faiss_export_names_the_extra(tmp_path):
    run, sets = tmp_path / "run", [x for s in TINY for x in ("--set", s)]
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = {
        "train": ["train", "--config", str(config), "--out", str(run), *sets],
        "evaluate": ["evaluate", "--run", str(run)],
        "export": ["export", "--run", str(run), "--out", str(tmp_path / "bundle")],
        "recommend": ["recommend", "--index", str(tmp_path / "bundle"), "--items", "1"],
        "ldiffrec": ["train", "--config", str(config), "--out", str(tmp_path / "l"), *sets,
                     "--set", "model=ldiffrec", "--set", "ldiffrec.n_clusters=2",
                     "--set", "ldiffrec.embeddings=svd", "--set", "ldiffrec.emb_dim=3"],
    }
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["train"][0] == 0 and got["evaluate"][0] == 0
    assert not got["faiss imported"]
    for name in ("export", "recommend", "ldiffrec"):
        code, err = got[name]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert "needs faiss" in lines[0] and "pip install 'scale-diffrec[cpu]'" in lines[0]
    assert not (tmp_path / "bundle").exists()
