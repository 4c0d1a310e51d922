"""The scaling benchmark end to end on a tiny catalogue (local gloo launcher)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
