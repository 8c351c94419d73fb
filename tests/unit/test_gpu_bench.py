"""``bench/gpu.sh``'s CPU fallback end to end (what CI runs where there is no GPU): tiny stand-in, tiny sizes.

A subprocess, as a user runs it: the benchmark writes its own stand-in hub cache, which must happen before
huggingface_hub is imported, and this test process has imported it already. Timings are not checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_cpu_fallback_writes_the_table_with_the_device_named(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, "-W", "error", "-m", "bench", "gpu", "--model", "tiny", "--device", "cpu", "--n", "40",
                           "--batch-size", "16", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "gpu.md").read_text()
    written = json.loads((tmp_path / "gpu.json").read_text())
    config, data = written["config"], written["data"]
    assert "| device | cpu (fallback) |" in md and config["device"] == "cpu (fallback)"
    assert f"| torch | {written['machine']['torch']} |" in md and data["versions"]["device"] == "cpu (fallback)"
    rate = re.search(r"\| images/s, end to end [^|]*\| ([0-9.]+) ", md)
    assert rate and float(rate.group(1)) > 0 and data["images_per_second"]["median"] > 0
    assert len(data["runs"]) == 1 and config["n"] == 40 and config["batch_size"] == 16
    agreement = data["agreement"]
    assert agreement["sample"] == 32 and agreement["cosine_min"] >= 0.9999 and agreement["cosine_mean"] >= 0.9999
    assert agreement["pixels_differing"] == 0 and agreement["pixels_max_abs_diff"] == 0.0  # bit-exact on the CPU
    assert "| single query, first time |" in md and "| single query, repeated |" in md
    for kind in ("first time", "repeated"):
        assert data["text"][kind]["samples"] == 24 and data["text"][kind]["p50_ms"] > 0
    assert data["text"]["batch"]["queries"] == 24 and data["text"]["batch"]["top_shape"] == [24, 10]
    assert "target: >= 20,000 images/s" in md and "not met (CPU fallback" in md
    assert data["target"] == {"images_per_second": 20_000, "met": False}
    assert (tmp_path / "latest.md").is_file()


def test_the_wrapper_is_a_strict_bash_script_running_the_gpu_benchmark():
    text = (REPO / "bench" / "gpu.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert '-m bench gpu "$@"' in text and ".venv/bin/python" in text
    assert os.access(REPO / "bench" / "gpu.sh", os.X_OK)
