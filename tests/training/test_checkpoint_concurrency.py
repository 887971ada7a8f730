"""Two runs of one config at once: the second stops with one line instead of overwriting the first's
checkpoint; the lock dies with its process, so a killed run leaves none behind."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fewshot_med.errors import FewshotMedError
from fewshot_med.models.checkpoint import checkpoint_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from fewshot_med.models.checkpoint import checkpoint_lock
    with checkpoint_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds the lock of the checkpoint at ``path`` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_checkpoint_is_refused_and_freed_when_its_holder_dies(tmp_path):
    path = tmp_path / "run" / "pretrain.pt"
    holder = hold_lock(path)
    in_use = f"checkpoint in use by process {holder.pid} on "
    with pytest.raises(FewshotMedError, match=in_use) as refused, checkpoint_lock(path):
        pass
    assert str(path) in str(refused.value) and "runtime.output_dir" in str(refused.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with checkpoint_lock(path) as locked:
        assert locked == path
        assert (
            tmp_path / "run" / "pretrain.pt.lock"
        ).read_text() == f"process {os.getpid()} on {socket.gethostname()}"


@pytest.mark.slow
def test_a_second_run_of_the_same_config_stops_with_one_line(tmp_path, tiny_pipeline):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**tiny_pipeline, "tracking": {"enabled": False}}))
    checkpoint = tmp_path / "outputs" / "tiny" / "pretrain.pt"
    holder = hold_lock(checkpoint)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "fewshot_med", "pretrain", "tiny.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: outputs/tiny/pretrain.pt: checkpoint in use by")
    assert not checkpoint.exists()
