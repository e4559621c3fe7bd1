"""``autoprune ui``: the MLflow UI over the tracking store, served on 127.0.0.1 until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Mapping

from autoprune.tracking.store import check_readable, is_server, resolve_store

UI_HOST = "127.0.0.1"
RUNS_VIEW = "#/experiments/{id}/runs?workflowType=machine_learning"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn does: a port left in TIME_WAIT by a server that just stopped is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((UI_HOST, port))
        except OSError:
            return False
    return True


def _get_json(url: str, body: Mapping[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def _runs_view(base_url: str) -> str:
    """The runs table of the experiment with the latest run (else the newest experiment), if any.

    Asked through the server's REST API, so that this process never imports mlflow and stays small.
    """
    api = f"{base_url}/api/2.0/mlflow"
    experiments = _get_json(f"{api}/experiments/search", {"max_results": 1000, "order_by": ["creation_time DESC"]}).get("experiments", [])
    ids = [e["experiment_id"] for e in experiments]
    if not ids:
        return ""
    runs = _get_json(f"{api}/runs/search", {"experiment_ids": ids, "max_results": 1, "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    latest = runs[0]["info"]["experiment_id"] if runs else ids[0]
    return RUNS_VIEW.format(id=latest)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.25)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """The server runs in its own process group (mlflow's CLI plus uvicorn): end the whole group."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_ui(*, port: int, tracking_uri: str | None = None) -> int:
    """Serve the MLflow UI over the tracking store on 127.0.0.1 until Ctrl-C (or SIGTERM/SIGHUP); 0 when
    stopped that way, the server's exit status when it ends by itself.

    Lean on purpose: one uvicorn worker and no job executor (about 0.5 GB instead of ~3 GB for ``mlflow ui``).
    """
    check_readable(tracking_uri)
    uri, artifacts = resolve_store(tracking_uri)
    if is_server(uri):
        print(f"error: {uri} is a tracking server already: open it in a browser", file=sys.stderr)
        return 2
    if not _port_free(port):
        print(f"error: port {port} on {UI_HOST} is in use: choose another with --port", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", UI_HOST, "--port", str(port)]
    command += ["--workers", "1", "--uvicorn-opts", "--no-access-log"]
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        command += ["--artifacts-destination", str(artifacts)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base_url = f"http://{UI_HOST}:{port}"
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # The server's log stays out of the terminal (warnings at start-up) unless it fails to start.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if not _wait_ready(process, base_url):
                _stop(process)
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-20:]
                print("error: the MLflow server did not start:\n" + "\n".join(tail), file=sys.stderr)
                return process.returncode or 1
            try:
                view = _runs_view(base_url)
            except (OSError, ValueError, KeyError):
                view = ""
            print(f"MLflow UI over {uri}\n  {base_url}/{view}\nPress Ctrl-C to stop.", flush=True)
            return process.wait()
        except KeyboardInterrupt:
            _stop(process)
            print("MLflow UI stopped.", flush=True)
            return 0
        finally:
            if process.poll() is None:
                _stop(process)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
