"""scripts/slurm_train.sbatch builds the multi-node torchrun command from SLURM's variables (run with stub
`srun`, `scontrol` and `torchrun` that record what they were asked)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sbatch"


def test_the_sbatch_script_starts_one_torchrun_per_node_with_slurms_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'echo node-a; echo node-b',
        "srun": 'echo "srun $*" >> "$LOG"; shift; "$@"',  # drop --kill-on-bad-exit, run the rest
        "torchrun": 'echo "torchrun $*" >> "$LOG"',
    }
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/bash\n{body}\n")
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(SCRIPT), "experiment=cloud_scale", "data.train_path=/data/x.json"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    torchrun = next(line for line in log.read_text().splitlines() if line.startswith("torchrun"))
    for expected in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_id=4242", "--rdzv_backend=c10d",
                     "--rdzv_endpoint=node-a:29500",
                     "-m vir.cli.train training.resume_from_checkpoint=auto experiment=cloud_scale "
                     "data.train_path=/data/x.json"):
        assert expected in torchrun, (expected, torchrun)
