"""``mlflow models serve`` of a registered classifier: base64 PNG and DICOM over HTTP get the answers of
``predict_table`` on the same files, and the server is stopped with its whole process group."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.conftest import SIZE, dicom_bytes, png_bytes

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_ping(server: subprocess.Popen, url: str, log: Path) -> None:
    """Wait until ``/ping`` answers; skip when the server exits first for want of a network."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            if any(
                word in tail for word in ("pip install", "Could not find a version", "NewConnectionError")
            ):
                pytest.skip(f"mlflow models serve needs a network here: {tail.splitlines()[-1]}")
            raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping in {STARTUP_SECONDS} s")


def stop(server: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn and its workers); kill it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # workers outlive the leader for a moment
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
def test_served_model_classifies_base64_png_and_dicom(registered, classifier, rare, tmp_path):
    png = tmp_path / "lesion.png"
    png.write_bytes(png_bytes(rare.images[0]))
    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(dicom_bytes((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 16).astype(np.uint16)))
    expected = classifier.predict_table([png, dicom])

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.store, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # mlflow starts ``uvicorn`` by name: the interpreter's scripts folder must be on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered.registered_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("wb") as output:
        server = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    try:
        wait_for_ping(server, url, log)
        rows = [[base64.b64encode(path.read_bytes()).decode()] for path in (png, dicom)]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    finally:
        stop(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # no process of the server's group is left

    classes = list(classifier.class_names)
    assert [list(row) for row in predictions] == [list(expected.columns)] * 2
    got = np.array([[row[name] for name in classes] for row in predictions])
    np.testing.assert_allclose(got, expected[classes].to_numpy(), rtol=0, atol=1e-6)
    assert [row["prediction"] for row in predictions] == list(expected["prediction"])
    assert [row["error"] for row in predictions] == ["", ""]
