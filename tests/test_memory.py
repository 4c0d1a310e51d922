"""The memory model's terms against the tensors they count."""
import numpy as np
import pytest

from scale_diffrec.config import load_config, typed
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


def _diffurec_cfg(*extra):
    return load_config(None, ["model=diffurec", "diffurec.hidden=16", "diffurec.heads=2",
                              "diffurec.max_len=10", "diffurec.n_clusters=2", "batch_size=40",
                              *extra])


def test_diffurec_terms_count_the_owned_table_rows_and_the_denoiser():
    from scale_diffrec.models.diffurec import DiffuRec
    from scale_diffrec.memory_model import diffurec_worker_terms
    from scale_diffrec.shard.context import Shard
    cfg = _diffurec_cfg()
    partition = Partition.blocks(1000, 2)
    shell = DiffuRec.from_config(typed(cfg), 1000, partition,
                                 Shard.single(partition.sizes.tolist(), None))
    one, two = (diffurec_worker_terms(cfg, partition.sizes, clusters, 1000, n_users=50,
                                      sequence_items=900, train_samples=750, workers=w)
                for clusters, w in (([0, 1], 1), ([1], 2)))
    assert one["sharded"] == 16 * shell.item_embeddings.weight.numel() == 2 * two["sharded"]
    assert one["denoiser"] == 16 * sum(p.numel() for p in shell.denoiser.parameters())
    assert one["tables"] == 32 * 1000 + 8 * 1000 and two["tables"] == 32 * 1000 + 8 * 500
    assert one["data"] == two["data"] == 4 * 900 + 8 * 50 + 24 * 750
    # the softmax's gradient parts of the owned rows (8 bytes each) on top of the
    # activations of B / W rows (a 40-row batch: 40 vs 20 rows per worker)
    from scale_diffrec.memory_model import diffurec_activation_bytes
    rows_saved = diffurec_activation_bytes(cfg) * 20
    assert one["step"] - two["step"] == rows_saved + 8 * 500 * 16 + 4 * 2 * 40 * 500
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))


def test_diffurec_activations_grow_by_one_blocks_worth_per_block_and_leave_out_weights():
    from scale_diffrec.memory_model import diffurec_activation_bytes
    by_blocks = [diffurec_activation_bytes(_diffurec_cfg(
        f"diffurec.blocks={n}", "diffurec.hidden=64", "diffurec.max_len=2")) for n in (1, 2, 3)]
    per_block = by_blocks[1] - by_blocks[0]
    assert per_block > 0 and by_blocks[2] - by_blocks[1] == per_block
    # a block's weights are 12 d^2 floats (192 KiB at d = 64); its activations on one
    # row of 2 positions a few dozen [2, 64] tensors: counting the weights would show
    assert per_block < 12 * 64 * 64 * 4 / 4
