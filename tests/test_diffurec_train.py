"""DiffuRec through the product (``model: diffurec``): ``scale-diffrec train`` on the tiny
config end to end (HR/NDCG@5/10/20 in metrics.json, ``evaluate`` reproduces them), resume
== an uninterrupted run, a bad ``diffurec`` key is one error line (exit 2, nothing
written), and the evaluator's HR/NDCG of a hand-made case, official and masked."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scale_diffrec.cli import main
from scale_diffrec.config import load_config
from scale_diffrec.data.sequences import sequences_from_interactions
from scale_diffrec.models import build_model
from scale_diffrec.train.loop import epoch_lr, split_metrics

QUICKSTART = "configs/diffurec-quickstart.yaml"
SMALL = ["data.synthetic.n_users=120", "data.synthetic.n_items=80"]


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """main() logs to the sys.stdout of the first call; each test gets its own (capsys)."""
    from scale_diffrec.progress import log
    log.handlers.clear()
    yield
    log.handlers.clear()


def _train(out, *sets, flags=()):
    args = ["train", "--config", QUICKSTART, "--out", str(out), *flags]
    for item in SMALL + list(sets):
        args += ["--set", item]
    return main(args)


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_train_writes_hr_and_ndcg_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    assert _train(tmp_path / "whole", "epochs=2") == 0
    whole = _metrics(tmp_path / "whole")
    assert whole["model"] == "diffurec" and [h["epoch"] for h in whole["history"]] == [1, 2]
    for split in ("valid", "test"):
        assert {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)} <= set(whole[split])
        assert whole[split]["n_users"] == 120
    assert whole["history"][0]["loss"] > 0 and "hr@10" in whole["history"][0]["valid"]
    assert _train(tmp_path / "split", "epochs=1") == 0
    assert _train(tmp_path / "split", "epochs=2", flags=["--resume"]) == 0
    split = _metrics(tmp_path / "split")
    assert [h["loss"] for h in split["history"]] == [h["loss"] for h in whole["history"]]
    assert split["best_epoch"] == whole["best_epoch"]
    for key in ("hr@5", "hr@10", "hr@20", "ndcg@10"):
        assert split["test"][key] == whole["test"][key]
        assert split["valid"][key] == whole["valid"][key]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "whole"), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hr@10"] == pytest.approx(whole["test"]["hr@10"], abs=1e-12)


@pytest.mark.parametrize("key, value, says", [
    ("diffurec.heads", "3", "--set diffurec.heads=3: config key 'diffurec.heads' (3) must "
                            "divide 'diffurec.hidden'"),
    ("diffurec.hiden", "8", "--set diffurec.hiden=8: unknown config key 'diffurec.hiden'"),
    ("diffurec.reverse_steps", "ddim5", "--set diffurec.reverse_steps=ddim5: config key "
                                        "'diffurec.reverse_steps'"),
    ("data.source", "diffrec_npy", "--set data.source=diffrec_npy: config key 'data.source'"),
    ("data.n_items", "50", "config key 'data.n_items' (50) differs from the 80 items")])
def test_a_bad_diffurec_key_is_one_error_line_and_nothing_is_written(tmp_path, capsys, key,
                                                                     value, says):
    sets = [f"{key}={value}"] + (["data.path=x"] if key == "data.source" else [])
    assert _train(tmp_path / "run", *sets) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert not (tmp_path / "run").exists()


def _hand_made():
    """3 users over 6 items; E = I, so the query is the score vector (hand-set per user)."""
    seqs = [[0, 1, 2, 3], [4, 5, 1], [2, 0, 4, 5, 3]]       # test targets 3, 1, 3
    users = np.repeat(np.arange(3), [len(s) for s in seqs])
    data = sequences_from_interactions(users, np.concatenate(seqs), 3, 6)
    cfg = load_config(None, ["model=diffurec", "diffurec.hidden=8", "diffurec.heads=2",
                             "diffurec.steps=4", "topk=[1, 3, 5]", "select_metric=hr@3"])
    model = build_model(cfg, 6)
    with torch.no_grad():
        model.item_embeddings.weight.copy_(torch.eye(6, 8))
    scores = torch.tensor([[5., 4, 3, 6, 2, 1],      # user 0: 3 0 1 2 4 5 (target 3: rank 0)
                           [6., 4, 5, 3, 2, 1],      # user 1: 0 2 1 3 4 5 (target 1: rank 2)
                           [5., 2, 6, 1, 4, 3]])     # user 2: 2 0 4 5 1 3 (target 3: rank 5)
    model.denoise = lambda inputs, generator=None: F.pad(scores, (0, 2))[:len(inputs)]
    return model, data, cfg


def test_the_evaluator_gives_hand_computed_hr_and_ndcg_official_and_masked():
    model, data, cfg = _hand_made()
    got = split_metrics(model, data, "test", cfg)
    assert (got["hr@1"], got["hr@3"], got["hr@5"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert got["recall@5"] == got["hr@5"] and got["n_users"] == 3
    # masked: the inputs' items leave the ranking (user 2's 2 0 4 5: target 3 at rank 1)
    masked = split_metrics(model, data, "test", {**cfg, "diffurec": {
        **cfg["diffurec"], "mask_history": True}})
    assert (masked["hr@1"], masked["hr@3"]) == pytest.approx((1 / 3, 1.0))
    assert masked["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 3)


def test_the_exported_flat_index_equals_brute_force_and_recommend_takes_a_sequence(
        tmp_path, capsys):
    pytest.importorskip("faiss")
    from scale_diffrec.retrieval import Retriever
    assert _train(tmp_path / "run", "epochs=1", "diffurec.n_clusters=2") == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 0
    retriever = Retriever.load(tmp_path / "b")
    histories = [[3, 17, 3, 52], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 1, 2]]
    for exclude in (True, False):
        flat = retriever.recommend(histories, k=10, exclude_seen=exclude)
        brute = retriever.recommend(histories, k=10, exclude_seen=exclude, brute_force=True)
        assert np.array_equal(flat[0], brute[0])
        np.testing.assert_allclose(flat[1], brute[1], rtol=1e-5, atol=1e-5)
        assert np.array_equal(retriever.recommend(histories, k=10, exclude_seen=exclude)[0],
                              flat[0])                                     # deterministic
    alone = retriever.recommend(histories[1:2], k=10, exclude_seen=False)   # another batch
    assert np.array_equal(alone[0][0], flat[0][1])
    np.testing.assert_allclose(alone[1][0], flat[1][1], rtol=1e-5, atol=1e-5)
    seen_out = retriever.recommend(histories, k=10)[0]          # seen items excluded
    assert all(not set(row) & set(h) for row, h in zip(seen_out, histories))
    # the order of the sequence is the query: reordered, another query
    again = retriever.recommend([[52, 3, 17, 3]], k=10, exclude_seen=False)
    assert not np.array_equal(again[1][0], flat[1][0])
    capsys.readouterr()
    assert main(["recommend", "--index", str(tmp_path / "b"), "--items", "3,17,3,52",
                 "-k", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == retriever.recommend(histories[:1], k=10)[0][0].tolist()
    import pyarrow as pa
    import pyarrow.parquet as pq
    two = [histories[0], histories[2]]       # batch mode: each user's rows in file order
    pq.write_table(pa.table({"user_id": np.repeat([7, 8], [len(h) for h in two]),
                             "item_id": np.concatenate(two)}), tmp_path / "h.parquet")
    assert main(["recommend", "--index", str(tmp_path / "b"), "--histories",
                 str(tmp_path / "h.parquet"), "--out", str(tmp_path / "r.parquet"),
                 "-k", "5"]) == 0
    recs = pq.read_table(tmp_path / "r.parquet").to_pydict()
    want = retriever.recommend(two, k=5)[0]
    assert recs["item"] == want.ravel().tolist() and recs["user"] == [7] * 5 + [8] * 5


def test_evaluation_does_not_depend_on_the_eval_batch_size(tmp_path):
    from scale_diffrec.evaluate import evaluate
    from scale_diffrec.runs import load_run
    assert _train(tmp_path / "run", "epochs=1") == 0
    run = load_run(tmp_path / "run")
    whole = evaluate(run.model, run.data, "valid", ks=[5, 10], batch_size=1000)
    small = evaluate(run.model, run.data, "valid", ks=[5, 10], batch_size=7)
    assert small == pytest.approx(whole, abs=1e-12) and whole["hr@10"] > 0


def test_the_lr_decays_by_epoch_as_steplr():
    groups = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [groups[0]], "lr": 1e-3},
                                   {"params": [groups[1]], "lr": 4e-3}])
    cfg = {"lr_decay_every": 2, "lr_decay": 0.5}
    for epoch, factor in ((0, 1), (1, 1), (2, 0.5), (3, 0.5), (4, 0.25), (0, 1)):
        epoch_lr(optimizer, cfg, epoch)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            [1e-3 * factor, 4e-3 * factor])
    epoch_lr(optimizer, {"lr_decay_every": None, "lr_decay": 0.5}, 4)   # off: unchanged
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
