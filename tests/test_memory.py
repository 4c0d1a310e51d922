"""The memory model's terms against the tensors they count."""
import numpy as np
import pytest

from scale_diffrec.config import load_config
from scale_diffrec.models.ldiffrec import LDiffRec
from scale_diffrec.memory_model import ZERO_BYTES, predict, worker_terms
from scale_diffrec.partition import Partition

SIZES = [500, 300, 150, 50]


def _cfg(*extra):
    return load_config(None, ["model=ldiffrec", "ldiffrec.n_clusters=4", "ldiffrec.in_dims=[20]",
                              "ldiffrec.mlp_dims=[16]", "batch_size=40", *extra])


@pytest.mark.parametrize("out_dims", ["[]", "[8]"])
def test_sharded_term_is_sixteen_bytes_per_parameter_of_the_workers_parts(out_dims):
    cfg = _cfg(f"ldiffrec.out_dims={out_dims}")
    partition = Partition(np.repeat(np.arange(4), SIZES), 4)
    shell = LDiffRec.from_config(cfg, sum(SIZES), partition)
    mine = [0, 3]
    params = sum(p.numel() for c in mine
                 for part in (shell.new_encoder(c), shell.new_decoder(c)) for p in part.parameters())
    terms = worker_terms(cfg, SIZES, mine, sum(SIZES), n_users=100, interactions=2000,
                         batch_nnz=800, workers=2)
    assert terms["sharded"] == 16 * params
    assert terms["tables"] == 32 * 1000 + 8 * (500 + 50)
    assert terms["data"] == 20 * 2000 + 24 * 100
    assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"))
    run = [worker_terms(cfg, SIZES, mine, sum(SIZES), 100, 2000, 800, 2, phase="run",
                        rank0=rank0) for rank0 in (False, True)]
    assert run[0]["finish"] == 16 * params                  # the best shard read back
    everything = sum(p.numel() for c in range(4)
                     for part in (shell.new_encoder(c), shell.new_decoder(c))
                     for p in part.parameters())
    assert run[1]["finish"] == 16 * params + 4 * everything + 8 * (everything - params)


def test_zero_stages_agree_on_one_worker_and_split_with_more():
    assert {ZERO_BYTES[s](1) for s in range(4)} == {16.0}
    assert ZERO_BYTES[3](4) < ZERO_BYTES[2](4) < ZERO_BYTES[1](4) < ZERO_BYTES[0](4)


def test_balanced_prediction_halves_the_sharded_term_with_twice_the_workers():
    cfg = _cfg("ldiffrec.out_dims=[8]", "ldiffrec.n_clusters=8", "ldiffrec.in_dims=[32]")
    one, two = (predict(cfg, 80_000, 1000, 30_000, w, runtime_bytes=5e8) for w in (1, 2))
    assert two["sharded"] == pytest.approx(one["sharded"] / 2, rel=0.02)
    assert two["data"] == one["data"] and two["runtime"] == one["runtime"] == 5e8
    evaluation = predict(cfg, 80_000, 1000, 30_000, 1, 5e8, phase="eval")
    assert evaluation["step"] >= one["step"] and evaluation["total"] >= one["total"]
