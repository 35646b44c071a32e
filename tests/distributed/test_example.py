"""examples/ddp.py runs under torchrun on 2 CPU processes, and its checkpoint resumes on 3."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_GLOO_EXIT_ABORT = "terminate called without an active exception"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, *args: str, cwd: Path) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}", str(ROOT / "examples" / "ddp.py"), *args,
    ]  # fmt: skip
    for _ in range(2):
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)
        # torch 2.13's gloo aborts a few percent of processes at exit, plain DDP scripts without
        # jdoptim included (measured here: 1 run in 25): run such a launch once more.
        if result.returncode == 0 or _GLOO_EXIT_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_ddp_example_runs_and_resumes_on_another_number_of_processes(tmp_path):
    first = _torchrun(2, "--steps", "3", cwd=tmp_path)
    assert "step 0: weights {'regression'" in first and "saved" in first
    second = _torchrun(3, "--steps", "2", "--per-sample", "--global-batch", "48", cwd=tmp_path)
    assert "resumed from jd_ddp_checkpoint.pt" in second and "saved" in second
