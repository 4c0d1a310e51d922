"""The scaling benchmark end to end on a tiny catalogue (local gloo launcher)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scale_diffrec.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_benchmark_writes_rows_plot_and_shards_memory(tmp_path):
    out = tmp_path / "scaling.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--items", "3000",
                    "--workers", "1", "2", "--users", "600", "--steps", "2", "--warmup", "1",
                    "--workdir", str(tmp_path / "work"), "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    one, two = sorted(result["rows"], key=lambda r: r["workers"])
    assert (one["items"], one["workers"], two["workers"]) == (3000, 1, 2)
    assert len(two["per_rank"]) == 2 and {r["rank"] for r in two["per_rank"]} == {0, 1}
    # every cluster's tensors live on exactly one worker: the two shards add up to W=1's
    shards = [r["sharded_mib"] for r in two["per_rank"]]
    assert sum(shards) == pytest.approx(one["sharded_mib_max"], rel=1e-6)
    assert max(shards) < one["sharded_mib_max"]
    assert two["collective_bytes_per_step"]["all_to_all_single"] > 0
    assert one["measured_over_model"] == 1.0                  # the calibration point
    assert result["machine"]["launcher"] == "local" and out.with_suffix(".png").stat().st_size


def test_catalogue_benchmark_filters_ratings_tunes_on_valid_and_times_passes(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    n = 4000
    ratings = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"user_id": rng.integers(0, 150, n), "item_id":
                             (rng.pareto(1.0, n) * 10).astype(np.int64) % 300,
                             "rating": rng.integers(1, 6, n).astype(np.int8)}), ratings)
    out = tmp_path / "catalogue.json"
    # a point outside the grid: one line, exit 2, before anything is prepared
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "catalogue.py"), "--only",
                          "itemknn", "--point", "4", "--ratings", str(ratings), "--runs",
                          str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and not (tmp_path / "runs").exists()
    assert bad.stderr.strip() == "error: --point 4: row 'itemknn' has 4 grid point(s) (0..3)"
    # one grid point alone (as parallel processes run them): its run, and no row
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "catalogue.py"), "--only",
                    "itemknn", "--point", "3", "--ratings", str(ratings), "--runs",
                    str(tmp_path / "runs"), "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)
    alone = sorted(p.name for p in (tmp_path / "runs" / "itemknn").iterdir() if p.is_dir())
    assert alone == ["k200_shrink100.0"] and not out.exists()
    made = (tmp_path / "runs" / "itemknn" / alone[0] / "metrics.json").stat().st_mtime_ns
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "catalogue.py"), "--only",
                    "mostpop", "--only", "itemknn", "--ratings", str(ratings), "--runs",
                    str(tmp_path / "runs"), "--repeats", "1", "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)
    # every row trains on `scale-diffrec prepare`'s dataset: a pair counts once, at its
    # first row, and is an interaction when that row's rating is >= 4
    log = pq.read_table(ratings).to_pandas().drop_duplicates(["user_id", "item_id"])
    stats = json.loads((tmp_path / "runs" / "data" / "epinions" / "stats.json").read_text())
    assert sum(stats["interactions"].values()) == int((log["rating"] >= 4).sum())
    rows = json.loads(out.read_text())["rows"]
    knn = rows["itemknn"]
    assert len(knn["grid"]) == 4                                # k x shrink, 2 x 2
    # the point trained alone was reused, not trained again
    assert (tmp_path / "runs" / "itemknn" / alone[0] / "metrics.json").stat().st_mtime_ns == made
    assert knn["valid"]["recall@20"] == max(p["valid"]["recall@20"] for p in knn["grid"])
    chosen = [p for p in knn["grid"] if p["point"] == knn["selected"]]
    assert chosen and chosen[0]["valid"] == knn["valid"]
    pop = rows["mostpop"]            # linear head (d = 0): a bound; ItemKNN has none
    assert pop["scoring_gflop"] == pytest.approx(2 * pop["users"] * pop["items"] / 1e9)
    assert pop["bound_seconds"] > 0 and "bound_seconds" not in knn
    assert all(r["eval_seconds_per_pass"] > 0 and r["peak_rss_mib"] > 0 for r in rows.values())
    assert out.with_suffix(".png").stat().st_size
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "catalogue.py"), "--table",
                            "--out", str(out)], check=True, capture_output=True, text=True).stdout
    assert table.count("\n| ") == 2 and f"| {pop['test']['recall@20']:.4f} |" in table


def test_ranking_benchmark_checks_the_pass_and_times_it_beside_its_bound(tmp_path):
    out = tmp_path / "ranking.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ranking.py"), "--users", "250",
                    "--items", "3000", "--batch", "100", "--chunk-mib", "default", "0.1",
                    "--repeats", "1", "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    default, small = result["rows"]
    assert (default["chunk_mib"], small["chunk_mib"]) == (None, 0.1)
    assert default["chunk_items"] == 20971 and small["chunk_items"] == 262  # 8, 0.1 MiB / 400 B
    for row in result["rows"]:
        assert row["check_first_batch"] == {"values_equal": True, "items_scored_so": True}
        assert row["pass_seconds"] > 0 and row["pass_over_bound"] == pytest.approx(
            row["pass_seconds"] / (result["bound_matmul_seconds"][0]
                                   + result["bound_topk_seconds"][0]))      # one repeat
    assert result["scoring_gflop"] == pytest.approx(2 * 250 * 3000 * 65 / 1e9)
    assert len(result["bound_matmul_seconds"]) == len(result["bound_topk_seconds"]) == 1


TINY_DIFFUREC = ["diffurec.hidden=16", "diffurec.blocks=1", "diffurec.heads=2",
                 "diffurec.steps=4", "diffurec.max_len=10"]


def test_scaling_benchmark_diffurec_shards_the_item_table_and_times_a_ranking_pass(tmp_path):
    out = tmp_path / "scaling.json"
    sets = [a for s in TINY_DIFFUREC + ["batch_size=64", "diffurec.dropout=0",
                                         "diffurec.emb_dropout=0"] for a in ("--set", s)]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--config",
                    "configs/diffurec-synthetic-1m.yaml", "--items", "3000", "--workers", "1",
                    "2", "--users", "150", "--steps", "2", "--warmup", "1", "--eval", *sets,
                    "--workdir", str(tmp_path / "work"), "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)
    result = json.loads(out.read_text())
    assert result["model"] == "diffurec"
    one, two = sorted(result["rows"], key=lambda r: r["workers"])
    # E's rows, gradient and AdamW moments: 16 bytes x 16 floats per item owned, exactly as
    # the memory model says; 2 equal blocks halve them
    for row in (one, two):
        for rank in row["per_rank"]:
            # (+ 4: AdamW's step count, a float32 scalar the model leaves out)
            assert rank["sharded_mib"] * 2 ** 20 == 16 * 16 * rank["items"] + 4
            assert rank["model_mib"]["sharded"] * 2 ** 20 == 16 * 16 * rank["items"]
    assert [r["items"] for r in two["per_rank"]] == [1500, 1500]
    assert two["sharded_mib_max"] * 2 ** 20 - 4 == (one["sharded_mib_max"] * 2 ** 20 - 4) / 2
    assert two["collective_bytes_per_step"]["all_reduce"] > 0      # the embedded batch
    for row in (one, two):
        ev = row["eval"]
        assert ev["eval_users"] == one["users"] and ev["eval_seconds"] > 0
        assert ev["scoring_gflop"] == pytest.approx(2 * one["users"] * 3000 * 17 / 1e9)
        assert ev["query_gflop"] > 0 and ev["topk_seconds"] > 0
        assert ev["pass_over_bound"] == pytest.approx(ev["eval_seconds"] / ev["bound_seconds"])
    # the same parameters rank the same items: the W-worker pass gives one process's metrics
    assert two["eval"]["eval_metrics"] == pytest.approx(one["eval"]["eval_metrics"])


def _reproduce_module():
    import importlib.util
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("reproduce",
                                                      ROOT / "benchmarks" / "reproduce.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_reproduce_runs_diffurec_rows_only_with_cuda_unless_asked():
    reproduce = _reproduce_module()
    diffurec = {"diffurec-beauty", "diffurec-toys", "diffurec-ml1m"}
    assert diffurec <= set(reproduce.default_rows(cuda=True))
    assert not diffurec & set(reproduce.default_rows(cuda=False))
    assert "diffrec-clean" in reproduce.default_rows(cuda=False)
    assert reproduce.PAPER["diffurec-beauty"]["hr@10"] == 7.9068


def test_reproduce_diffurec_row_trains_the_product_and_records_percent_beside_the_paper(
        tmp_path):
    tiny = ["data.source=synthetic", "data.path=null", "data.synthetic.n_users=120",
            "data.synthetic.n_items=80", "data.synthetic.mean_items_per_user=8", "epochs=2",
            "eval_every=1", "batch_size=64", *TINY_DIFFUREC]
    out, runs = tmp_path / "reproduce.json", tmp_path / "runs"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--only",
                    "diffurec-beauty", *[a for s in tiny for a in ("--set", s)], "--runs",
                    str(runs), "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=300, capture_output=True)
    row = json.loads(out.read_text())["rows"]["diffurec-beauty"]
    metrics = json.loads((runs / "diffurec-beauty" / "metrics.json").read_text())
    assert (runs / "diffurec-beauty.yaml").is_file()        # the config the CLI ran
    assert row["unit"] == "%" and row["epochs_run"] == 2 and row["workers"] == 1
    assert row["best_epoch"] == metrics["best_epoch"]       # selected on valid hr@10
    for k in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"):
        assert row["test"][k] == pytest.approx(100 * metrics["test"][k])
        assert row["ratio_to_paper"][k] == pytest.approx(row["test"][k] / row["paper"][k])
    assert (row["paper"]["hr@10"], row["paper"]["ndcg@10"]) == (7.9068, 4.7494)


@pytest.mark.parametrize("args, words", [
    (["--set", "epochs=abc"], "--set epochs=abc: config key 'epochs'"),
    (["--seeds=-1"], "--set seed=-1: config key 'seed' must be >= 0"),
    (["--seeds", "2", "--from-runs"], "--from-runs trains nothing"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--out", "."], "--out .: is a folder"),
    (["--out", f"{ROOT}/README.md/o.json"], "README.md/o.json: cannot be created: "),
    (["--out", "/proc/o.json"], "--out /proc/o.json: cannot write in /proc"),
])
def test_reproduce_refuses_bad_options_in_one_line_before_training(tmp_path, args, words):
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--only",
                          "diffrec-clean", "--runs", "runs", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and words in bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert list(tmp_path.iterdir()) == []


def test_reproduce_seeds_train_the_row_config_under_each_seed_and_record_the_spread(tmp_path):
    tiny = ["data.source=synthetic", "data.path=null", "data.synthetic.n_users=120",
            "data.synthetic.n_items=80", "data.synthetic.mean_items_per_user=8", "epochs=1",
            "eval_every=1", "batch_size=64", "seed=5", *TINY_DIFFUREC]
    out, runs = tmp_path / "reproduce.json", tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--only",
           "diffurec-beauty", *[a for s in tiny for a in ("--set", s)], "--runs", "runs",
           "--out", "reproduce.json"]                     # relative to the caller's folder
    bad = subprocess.run(cmd + ["--seeds", "2,x"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --seeds"), bad.stderr
    assert not out.exists() and not runs.exists()
    subprocess.run(cmd + ["--seeds", "2,5"], check=True, cwd=tmp_path, timeout=300,
                   capture_output=True)
    row = json.loads(out.read_text())["rows"]["diffurec-beauty"]
    assert sorted(row["seeds"]) == ["2", "5"]               # the config's own seed is the row
    assert row["seeds"]["5"] == row["test"]
    other = json.loads((runs / "diffurec-beauty-seed2" / "metrics.json").read_text())
    assert load_config(runs / "diffurec-beauty-seed2.yaml")["seed"] == 2
    for k, spread in row["seed_spread"].items():
        values = [row["test"][k], 100 * other["test"][k]]
        assert spread["mean"] == pytest.approx(sum(values) / 2)
        assert spread["sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert (spread["min"], spread["max"]) == pytest.approx((min(values), max(values)))

    # --tuned: the row is the search's selected run itself (TUNED/ROW/best), not a re-run
    search = tmp_path / "tuned" / "diffurec-beauty"
    search.mkdir(parents=True)
    (search / "best.yaml").write_text((runs / "diffurec-beauty.yaml").read_text())
    (search / "best").symlink_to(runs / "diffurec-beauty")
    (search / "tune.json").write_text(json.dumps({"search": "optuna", "trials": 4, "table": "t",
                                                  "best": {"params": {"lr": 0.001}}}))
    selected = json.loads((runs / "diffurec-beauty" / "metrics.json").read_text())
    selected["test"] = {k: v / 2 if isinstance(v, float) else v      # tell it apart
                        for k, v in selected["test"].items()}
    (runs / "diffurec-beauty" / "metrics.json").write_text(json.dumps(selected))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--only",
                    "diffurec-beauty", "--tuned", str(tmp_path / "tuned"), "--runs",
                    str(tmp_path / "runs2"), "--out", str(out), "--seeds", "5"],
                   check=True, cwd=tmp_path, timeout=300, capture_output=True)
    row = json.loads(out.read_text())["rows"]["diffurec-beauty"]
    assert row["tuned"]["trials"] == 4 and row["config"] == str(search / "best.yaml")
    assert row["test"] == {k: pytest.approx(100 * selected["test"][k]) for k in row["test"]}
    assert not (tmp_path / "runs2").exists()            # nothing trained


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_refuses_an_unwritable_out_in_one_line_before_any_work(script, tmp_path):
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out",
                          "/proc/result.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: --out /proc/result.json: cannot write in /proc: ")
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert list(tmp_path.iterdir()) == []
