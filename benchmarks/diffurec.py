"""DiffuRec on the released data (one process): train with the released settings, select on
valid, report test HR@K / NDCG@K (K = 5, 10, 20, %) and the respacing trade-off.

    nice -n 10 python benchmarks/diffurec.py --datasets amazon_beauty --minutes 30

Official protocol (../shared/DIFFUREC.md): leave-one-out, full ranking of every item, no
history masking, the pad excluded (it is not an item here); seed 1997. Training: Adam
lr 1e-3, StepLR(100 epochs, 0.1), batch 512, every train prefix a sample (in a new order
each epoch), validation every ``--eval-interval`` epochs (released: 20; patience 5
validations), the best validation HR@10 selects the model. ``--minutes`` caps the
training time per dataset, mid-epoch if need be (then validated once; "epochs" counts
the fraction done; the released runs go up to 500 epochs). ``--valid-users`` /
``--test-users`` / ``--respace-users``: a fixed random subset of users for validation, the
test (every reverse step) and the respacing sweep (0: all users).
Writes ``--out`` (default benchmarks/results/diffurec.json, merged by dataset); seconds
are this machine's, shared with other jobs (contended).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale_diffrec.data.diffurec_release import load_diffurec_release  # noqa: E402
from scale_diffrec.files import output_file_arg  # noqa: E402
from scale_diffrec.metrics import MetricAccumulator  # noqa: E402
from scale_diffrec.models.diffurec import DiffuRec  # noqa: E402
from scale_diffrec.runs import write_json  # noqa: E402
from scale_diffrec.schema import DiffuRecConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "diffurec"
OUT = ROOT / "benchmarks" / "results" / "diffurec.json"
KS = (5, 10, 20)
PAPER = {"amazon_beauty": {"hr@5": 5.5758, "hr@10": 7.9068, "hr@20": 11.1098,
                           "ndcg@5": 4.0047, "ndcg@10": 4.7494, "ndcg@20": 5.5566},
         "toys": {"hr@5": 5.5650, "hr@10": 7.4587, "hr@20": 9.8417,
                  "ndcg@5": 4.1667, "ndcg@10": 4.7724, "ndcg@20": 5.3684}}
RESPACINGS = ("1", "2", "4", "8", "16", None)
# the released training settings (official src/main.py; configs/diffurec-*.yaml)
SEED, LR, BATCH, DECAY_STEP, GAMMA, PATIENCE = 1997, 1e-3, 512, 100, 0.1, 5


def evaluate(model: DiffuRec, seqs, split: str, users: np.ndarray, batch: int = 1024) -> dict:
    """{"hr@K", "ndcg@K"} in % over ``users`` (one target each: HR@K == Recall@K) and
    "seconds_per_1000_users" of the query + ranking."""
    acc, start = MetricAccumulator(KS), time.perf_counter()
    positions = seqs.eval_positions(split)[users]
    for inputs, targets in seqs.iter_batches(positions, batch, model.cfg.max_len):
        top = model.top_k(model.denoise(inputs), max(KS))
        acc.add(top, targets[:, None].numpy())
    seconds = time.perf_counter() - start
    got = acc.result()
    out = {f"{m}@{k}": round(100 * got[f"{src}@{k}"], 4)
           for k in KS for m, src in (("hr", "recall"), ("ndcg", "ndcg"))}
    return {**out, "users": int(len(users)),
            "seconds_per_1000_users": round(1000 * seconds / len(users), 3)}


def subset(rng, n_users: int, size: int) -> np.ndarray:
    """[size] sorted random users (every user when size is 0 or at least n_users)."""
    every = np.arange(n_users)
    return every if not size or size >= n_users else np.sort(rng.choice(every, size, False))


def train(data: Path, name: str, cfg: DiffuRecConfig, minutes: float, users: dict, epochs: int,
          eval_interval: int) -> dict:
    seqs = load_diffurec_release(data / name)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = DiffuRec(seqs.n_items, cfg, seed=SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=DECAY_STEP, gamma=GAMMA)
    positions = seqs.train_positions()
    row = {"n_users": seqs.n_users, "n_items": seqs.n_items, "train_samples": int(len(positions)),
           "config": {**cfg.model_dump(mode="json"), "seed": SEED, "lr": LR,
                      "batch_size": BATCH, "decay_step": DECAY_STEP, "gamma": GAMMA,
                      "epochs": epochs, "eval_interval": eval_interval,
                      "patience": PATIENCE}, "epoch_seconds": [], "valid": [],
           "paper_test": PAPER.get(name)}
    per_epoch = -(-len(positions) // BATCH)
    best, best_state, bad, step, began = -1.0, None, 0, 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        start, total, seen, last = time.perf_counter(), 0.0, 0, False
        for inputs, targets in seqs.iter_batches(rng.permutation(positions), BATCH,
                                                 cfg.max_len):
            opt.zero_grad()
            out = model.sequence_loss(inputs, targets, step)
            out["loss"].backward()
            opt.step()
            step, total = step + 1, total + out["ce"].item() * len(targets)
            seen += len(targets)
            last = (time.perf_counter() - began) / 60 > minutes
            if last:
                break
        sched.step()
        done = step / per_epoch
        seconds = (time.perf_counter() - start) * len(positions) / seen
        row["epoch_seconds"].append(round(seconds, 1))
        print(f"{name} epoch {done:.3f}: ce {total / seen:.4f} ({seconds:.1f} s per epoch)",
              flush=True)
        if (epoch + 1) % eval_interval == 0 or last:
            got = {"epoch": round(done, 3), "train_ce": round(total / seen, 4),
                   **evaluate(model, seqs, "valid", users["valid"])}
            row["valid"].append(got)
            print(f"{name} valid {got}", flush=True)
            if got["hr@10"] > best:
                best, best_state, bad = got["hr@10"], copy.deepcopy(model.state_dict()), 0
                row["best_epoch"] = round(done, 3)
            else:
                bad += 1
        if last or bad >= PATIENCE:
            break
    row["epochs"] = round(step / per_epoch, 3)
    row["seconds_per_epoch_median"] = float(np.median(row["epoch_seconds"]))
    model.load_state_dict(best_state)
    row["test"] = evaluate(model, seqs, "test", users["test"])
    print(f"{name} test {row['test']}", flush=True)
    row["respacing"] = []
    for spec in RESPACINGS:
        spaced = DiffuRec(seqs.n_items, cfg.model_copy(update={"reverse_steps": spec}),
                          seed=SEED)
        spaced.load_state_dict(best_state)
        got = evaluate(spaced, seqs, "test", users["respace"])
        row["respacing"].append({"reverse_steps": len(spaced.kept), "spec": spec, **got})
        print(f"{name} respacing {row['respacing'][-1]}", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["amazon_beauty", "toys"])
    ap.add_argument("--minutes", type=float, default=60.0, help="training time cap per dataset")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--valid-users", type=int, default=0)
    ap.add_argument("--test-users", type=int, default=0)
    ap.add_argument("--respace-users", type=int, default=2000)
    ap.add_argument("--data", type=Path, default=DATA, help="the released DiffuRec datasets")
    ap.add_argument("--out", type=output_file_arg, default=str(OUT),
                    help="results JSON; datasets already in it are kept")
    args = ap.parse_args(argv)
    cfg = DiffuRecConfig()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.datasets:
        n_users = load_diffurec_release(args.data / name).n_users
        rng = np.random.default_rng(SEED)
        users = {split: subset(rng, n_users, getattr(args, f"{split}_users"))
                 for split in ("valid", "test", "respace")}
        results[name] = {"threads": torch.get_num_threads(), "contended": True,
                         **train(args.data, name, cfg, args.minutes, users, args.epochs,
                                 args.eval_interval)}
        write_json(args.out, results)


if __name__ == "__main__":
    main()
