"""``fewshot-med ui``: a taken port is one error line, and stopping the command stops the server's group."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def ui(port: int, cwd: Path) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "fewshot_med", "ui", "--port", str(port)]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


def test_a_taken_port_is_one_error_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = ui(port, tmp_path)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert stdout == "" and len(stderr.strip().splitlines()) == 1, stdout + stderr
    assert stderr.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and "--port" in stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the server's process through /proc")
def test_sigterm_takes_the_server_and_its_workers_down(tmp_path, empty_store):
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
    port = free_port()
    process = ui(port, tmp_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"the UI never answered: {process.communicate()[1][-2000:]}")
    (server,) = children(process.pid)
    assert os.getpgid(server) == server != os.getpgid(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "interrupted (SIGTERM): stopping the MLflow server" in stderr and "--resume" not in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(server, 0)
