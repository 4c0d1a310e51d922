"""A reader of a bundle sees exactly one complete export, whatever exports run meanwhile.

The interleavings are made deterministic by running exports inside the reader's load,
between its resolution of CURRENT and its first open (the hook is ``resolve``)."""

import numpy as np
import pytest
import torch

from scale_diffrec.config import load_config
from scale_diffrec.data import load_data
from scale_diffrec.errors import DataError
from scale_diffrec.models import build_model
from scale_diffrec.retrieval import Retriever, export, resolve
from scale_diffrec.retrieval import bundle
from scale_diffrec.retrieval import retriever as retriever_module
from scale_diffrec.runs import TrainedRun

CFG = ["model=multvae", "multvae.dims=[4, 8]", "data.source=synthetic",
       "data.synthetic.n_users=30", "data.synthetic.n_items=40"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of the same shape with different weights."""
    cfg = load_config(None, CFG)
    data = load_data(cfg)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(TrainedRun(tmp_path_factory.mktemp("run"), cfg, data,
                              build_model(cfg, data.n_items).eval(), None))
    return out


def is_export_of(retriever: Retriever, run: TrainedRun) -> bool:
    """The tower's weights and every FAISS vector are those of ``run``'s model."""
    tower = all(torch.equal(a, b) for a, b in zip(retriever.model.state_dict().values(),
                                                  run.model.state_dict().values()))
    (head,) = run.model.item_heads()
    vectors = np.concatenate([u.index.reconstruct_n(0, u.index.ntotal) for u in retriever.units])
    index = np.array_equal(vectors[:, :-1], head.weight.numpy()) and \
        np.array_equal(vectors[:, -1], head.bias.numpy())
    return tower and index


def interleave(monkeypatch, *exports) -> list[str]:
    """Make the next load export ``exports`` between resolving CURRENT and opening files;
    returns (once loaded) the names of the versions those exports made."""
    real = bundle.resolve
    pending, names = list(exports), []

    def resolve_then_export(folder):
        version = real(folder)
        while pending:
            export(pending.pop(0), folder)
            names.append(real(folder).name)
        return version
    monkeypatch.setattr(retriever_module, "resolve", resolve_then_export)
    return names


def test_an_export_during_a_load_does_not_mix_bundles(runs, tmp_path, monkeypatch):
    a, b, _ = runs
    out = export(a, tmp_path / "bundle")
    interleave(monkeypatch, b)
    loaded = Retriever.load(out)
    assert is_export_of(loaded, a) and not is_export_of(loaded, b)
    assert is_export_of(Retriever.load(out), b)           # the next reader sees the new one
    items, scores = loaded.recommend_indexes(a.data.train, 10)
    ref_items, ref_scores = loaded.recommend_indexes(a.data.train, 10, brute_force=True)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_a_version_removed_during_a_load_is_replaced_by_the_current_one(runs, tmp_path,
                                                                       monkeypatch):
    a, b, c = runs
    out = export(a, tmp_path / "bundle")
    first = resolve(out)
    names = interleave(monkeypatch, b, c)      # two exports: the resolved version is pruned
    loaded = Retriever.load(out)
    assert not first.exists()
    assert is_export_of(loaded, c)
    # kept: the current version and the one before it (for readers still loading it)
    assert sorted(p.name for p in out.iterdir()) == ["CURRENT", *sorted(names)]


def test_current_pointing_nowhere_or_missing_is_one_line(runs, tmp_path):
    out = export(runs[0], tmp_path / "bundle")
    (out / "CURRENT").write_text("../elsewhere\n")
    with pytest.raises(DataError, match="CURRENT: names version '../elsewhere'"):
        Retriever.load(out)
    (out / "CURRENT").unlink()
    with pytest.raises(DataError, match=r"not an index bundle \(no CURRENT\)"):
        Retriever.load(out)
    with pytest.raises(DataError, match="no such folder"):
        Retriever.load(tmp_path / "absent")


def test_concurrent_exports_never_remove_a_version_about_to_become_current(runs, tmp_path,
                                                                          monkeypatch):
    """Export b renames its version into place; before it points CURRENT at it, export c
    runs to the end (and prunes). b's version must survive to be loaded."""
    a, b, c = runs
    out = export(a, tmp_path / "bundle")
    real = bundle.atomic_write
    pending = [c]

    def c_first(path, write):
        while pending:
            export(pending.pop(), out)
        real(path, write)
    monkeypatch.setattr(bundle, "atomic_write", c_first)
    export(b, out)
    assert is_export_of(Retriever.load(out), b)


def test_a_manifest_without_its_fields_is_one_line(runs, tmp_path):
    version = resolve(export(runs[0], tmp_path / "bundle"))
    manifest = bundle.read_manifest(version)
    for key in ("files", "heads", "n_items"):
        bundle.write_manifest(version, {k: v for k, v in manifest.items() if k != key})
        with pytest.raises(DataError, match=f"field '{key}' is missing"):
            Retriever.load(tmp_path / "bundle")


def test_non_finite_weights_are_not_exported(runs, tmp_path):
    run = runs[0]
    model = build_model(run.cfg, run.data.n_items).eval()
    with torch.no_grad():
        model.p_layers[-1].bias[3] = float("nan")
    with pytest.raises(DataError, match=r"'p_layers.1.bias' holds NaN or infinite values"):
        export(TrainedRun(run.run_dir, run.cfg, run.data, model, None), tmp_path / "b")
    assert not (tmp_path / "b").exists()
