"""`python -m vir.cli.launch` (what `make train` runs): torchrun whose failed worker's one-line error is the last
word, with its exit status, not torchrun's own traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_workers_config_mistake_ends_the_launch_with_its_line_and_status_2(tmp_path):
    command = [sys.executable, "-m", "vir.cli.launch", "--standalone", "--nproc_per_node=2", "-m", "vir.cli.train",
               "model=tiny", "training.output_dir=/etc"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "training.output_dir=/etc is a system directory" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
