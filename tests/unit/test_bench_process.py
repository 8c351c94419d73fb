"""The whole-process benchmark's memory measures (bench/process.py): the largest single process, and the sampled
peak of the sum over every process a command starts (a first cliplens run loads torch in a helper process)."""

from __future__ import annotations

import os
import sys

import pytest

from bench import process

MIB = 2**20
HOLD = ("import subprocess, sys, time; a = bytes(range(256)) * ({n} * 4096); "  # {n} MiB, every page touched
        "subprocess.run([sys.executable, '-c', 'b = bytes(range(256)) * ({n} * 4096); import time; time.sleep(0.6)'])")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="the tree is read from Linux's /proc")
def test_the_tree_peak_adds_a_helper_process_to_its_parent():
    tree: dict = {}
    wall, largest = process.run_once([sys.executable, "-c", HOLD.format(n=120)], dict(os.environ), tree=tree)
    assert wall > 0.6
    assert 120 <= largest < 2 * 120 + 30  # one process: the parent or the helper, each holding 120 MiB and Python
    assert tree["peak_mb"] >= 2 * 120  # both at once
    assert tree["peak_mb"] >= largest


def test_a_process_with_no_children_has_a_tree_of_itself():
    watch = process.TreePeak(os.getpid(), itself=True)
    import time

    time.sleep(0.1)
    mine = watch.stop()
    now = process._rss(os.getpid())
    assert now > 0 and abs(mine * MIB - now) <= 0.2 * now  # this process alone
