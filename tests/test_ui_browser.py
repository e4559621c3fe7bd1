"""End to end: `autoprune ui` over a tracked search, driven in headless Chromium (Debian's, never `playwright install`).

Selectors were measured on the MLflow 3.17 UI (see DESIGN.md): runs table at
``#/experiments/<id>/runs?workflowType=machine_learning``, child runs collapsed under their parent, metric and
tag columns hidden until chosen, an assistant panel kept shut through localStorage, and a page that polls
forever (so nothing here waits for network idle).
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autoprune.search.pareto import front_trials
from autoprune.tracking import Tracker
from test_tracking import free_port, new_study, run_trial, start

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEEP_ASSISTANT_SHUT = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)
TRIALS = 14


def descendants(pid: int) -> set[int]:
    """Processes below ``pid`` (the server runs in its own process group, so the test checks it by pid)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_url(process: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []], daemon=True).start()
    while True:
        line = lines.get(timeout=timeout)
        if "http://" in line:
            return line.strip()


def test_the_mlflow_ui_lists_the_trials_and_shows_the_pareto_plot(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    from playwright.sync_api import expect, sync_playwright

    store = tmp_path / "mlruns"
    study = new_study("browser")
    tracker = Tracker(study_name="browser", tracking_uri=str(store))
    start(tracker, study)
    rng = random.Random(4)
    for i in range(TRIALS):
        run_trial(study, tracker, rng, fail=i == 3)
    tracker.close()
    front = sorted(t.number for t in front_trials(study))

    port = free_port()
    command = [sys.executable, "-m", "autoprune.cli", "ui", "--port", str(port), "--tracking-uri", str(store)]  # `autoprune ui`
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    ui = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    server: set[int] = set()
    try:
        url = read_url(ui, timeout=120)
        server = descendants(ui.pid)
        assert url == f"http://127.0.0.1:{port}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.set_default_timeout(60_000)
            page.add_init_script(KEEP_ASSISTANT_SHUT)
            page.goto(url)

            page.get_by_text("search", exact=True).first.wait_for()
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand the parent
            for trial in study.trials:
                expect(page.get_by_text(f"trial-{trial.number:04d}", exact=True)).to_be_visible()

            query = page.get_by_placeholder(re.compile("metrics"))
            query.fill('tags.pareto = "true"')
            query.press("Enter")
            expect(page.get_by_text(re.compile(r"^trial-\d{4}$"))).to_have_count(len(front))
            for number in front:
                expect(page.get_by_text(f"trial-{number:04d}", exact=True)).to_be_visible()
            page.get_by_role("button", name="Columns").click()
            for column in ("Dataset", "Source", "Models", "accuracy", "bops", "pareto_rank"):
                page.locator(f'span[title="{column}"]').first.click()
            page.keyboard.press("Escape")
            expect(page.locator('[role="columnheader"][col-id="metrics.`bops`"]')).to_be_visible()
            page.screenshot(path=tmp_path / "mlflow-ui-front.png")

            artifact = f"#/experiments/{tracker.experiment_id}/runs/{tracker.parent_run_id}/artifactPath/pareto_front.png?workflowType=machine_learning"
            page.goto(url.split("#")[0] + artifact)
            image = page.locator('img[alt="pareto_front.png"]').first
            image.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            page.screenshot(path=tmp_path / "mlflow-ui-plot.png")
            browser.close()
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        try:
            code_at_exit = ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            code_at_exit = ui.wait()
        left = [pid for pid in server if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert code_at_exit == 0
    assert not left, f"server processes outlived Ctrl-C: {left}"
    assert (tmp_path / "mlflow-ui-front.png").stat().st_size > 10_000
    assert (tmp_path / "mlflow-ui-plot.png").stat().st_size > 10_000
