"""Beyond one machine, with the real things: a Ray cluster started by `ray start --head`,
a PostgreSQL server, and optuna-dashboard loaded in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import cli, pokestudy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def stop(proc: subprocess.Popen, leader_first: bool = False, sig: int = signal.SIGTERM) -> None:
    """Stop exactly the processes a test started: its own process group, with `sig`. `leader_first`: SIGTERM
    the group's leader alone first and let it stop the rest (`ray start --block` ends its node within seconds on
    its own SIGTERM, but with the whole group signalled it never exits and waited out the 30 s here)."""
    try:
        if leader_first:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, sig)  # the group, or what the leader left of it
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the leader may exit before the rest of its group
            os.killpg(proc.pid, 0)  # raises ProcessLookupError once every process of the group is gone
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_smoke_stored(url: str) -> None:
    trials = optuna.load_study(study_name="smoke", storage=url).get_trials()
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in trials)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL server from Debian's packages on a free 127.0.0.1 port (trust auth)."""
    bindir = next(Path("/usr/lib/postgresql").glob("*/bin"), None)
    if bindir is None:
        pytest.fail("PostgreSQL server binaries are missing: `.ci/run` installs Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="pokestudy-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                    "--auth=trust"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([*as_postgres, str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port),
                               "-h", "127.0.0.1", "-k", str(root)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port)
        import psycopg  # what the `[postgres]` extra installs, and what `postgresql://` means to SQLAlchemy

        for _ in range(50):
            try:
                con = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        con.execute("CREATE DATABASE pokestudy")
        con.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/pokestudy"  # the README's URL form
    finally:
        stop(server, sig=signal.SIGINT)  # fast shutdown: it ends the sessions this process still holds open
        shutil.rmtree(root, ignore_errors=True)


def test_smoke_study_on_postgresql_then_report_and_studies(postgres: str, tmp_path: Path, ray_local, capsys):
    """The commands run in-process (the console script's entry point), the run on the session's Ray."""
    run = cli(capsys, "run", "--study", "smoke", "--storage", postgres, "--results", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert_smoke_stored(postgres)
    report = cli(capsys, "report", "--study", "smoke", "--storage", postgres, "--results", str(tmp_path / "again"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "again" / "smoke" / "gap.csv").exists()
    studies = cli(capsys, "studies", "--storage", postgres)
    assert "smoke" in studies.stdout and "COMPLETE 16" in studies.stdout


def test_smoke_study_on_a_ray_cluster_started_with_ray_start(tmp_path: Path):
    port = free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port)
        out = pokestudy("run", "--study", "smoke", "--address", f"127.0.0.1:{port}", "--results", str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert_smoke_stored(f"sqlite:///{tmp_path / 'pokestudy.db'}")
    finally:
        stop(head, leader_first=True)
        marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves this for later `ray.init()`s
        if marker.exists() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()
    assert head.poll() is not None


def test_dashboard_in_headless_chromium_answers_the_question_at_a_glance(smoke_run, tmp_path: Path):
    """As a user sees it at 1280 px: the study page shows each verdict's effect with its family-wise interval
    beside the importance chart, the note leads with the verdicts, says what that chart measures and shows
    its figures inline, figures open, a trial page explains itself without scrolling sideways, and importance
    ranks only the factors. The smoke study gets a third replicate (a copy of its results folder), so that
    its claims have intervals. Screenshots of every page land in tmp_path, named in any failure message."""
    from playwright.sync_api import sync_playwright

    from pokestudy.report import build, summary, trial_figure
    from pokestudy.study import runner, spec
    from tests.test_study import write_spec

    results = tmp_path / "results"
    shutil.copytree(smoke_run[1], results)
    url = f"sqlite:///{results / 'pokestudy.db'}"
    runner.run_study(spec.load(str(write_spec(tmp_path, seeds=[0, 1, 2]))), storage=url, results=results,
                     study_name="smoke", trial_figure=trial_figure)
    claims = len(build(url, "smoke", results, ("md",), generator="pokestudy report --study smoke").claims)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pokestudy", "dashboard", "--port", str(port), "--storage", url,
                               "--results", str(results)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    shots = f"screenshots in {tmp_path}"
    try:
        wait_for_port(port)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            importances: list[dict] = []
            page.on("response",
                    lambda r: importances.append(r.json()) if r.url.endswith("/param_importances") else None)
            page.goto(f"{base}/dashboard")
            link = page.get_by_role("link", name="smoke")
            link.wait_for(timeout=30_000)
            study_path = link.get_attribute("href")

            page.goto(base + study_path)  # the study page: named objective, figures, importance
            figures = page.locator("img[src^='/artifacts/']")
            figures.first.wait_for(timeout=30_000)
            page.get_by_text("Hyperparameter Importance").first.wait_for(timeout=30_000)
            assert figures.count() >= 4, shots
            image = page.request.get(base + figures.first.get_attribute("src"))
            assert image.ok and image.headers["content-type"] == "image/png"
            assert "val_acc (last epoch)" in page.inner_text("body"), shots
            ranked = {p["name"] for imp in importances for obj in imp["param_importances"] for p in obj}
            assert ranked == {"arch", "augment", "regularization"}, f"importance ranks {ranked}; {shots}"
            chart = page.locator(".js-plotly-plot", has_text="Verdicts: paired effect on the gap")
            chart.wait_for(timeout=30_000)  # the verdicts' effects with their intervals, beside the importance
            chart.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
            drawn = chart.text_content()
            assert "arch=resnet vs cnn" in drawn and "family-wise intervals" in drawn, shots
            intervals = re.findall(r"[-+]\d+\.\d \[[-+]\d+\.\d, [-+]\d+\.\d\]", drawn)
            assert len(intervals) == claims, f"each claim's gap with its interval; {shots}"
            assert "top 10% of trials by validation accuracy" in drawn, f"what importance ranks, beside it; {shots}"

            page.goto(f"{base}{study_path}/trials")  # a trial explains itself
            page.get_by_text("Accuracy and gap in % per epoch").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "trial.png"), full_page=True)
            body = page.inner_text("body")
            # whichever trial the list opens first (Ray may start two trials in either order): its condition
            assert re.search(r"arch=\w+, augment=[\w-]+, regularization=\w+", body) and "converged" in body, shots
            assert page.locator("pre").first.inner_text().split()[:3] == ["epoch", "lr", "train"], shots
            assert page.locator("img[src^='/artifacts/']").count() >= 1, f"the trial's curves figure; {shots}"
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 1280, f"trial page is {width} px wide; {shots}"

            page.goto(f"{base}{study_path}/note")  # the note leads with the answer
            page.get_by_text("Verdicts").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "note.png"), full_page=True)
            note = page.inner_text("body")
            assert note.index("Verdicts") < note.index("Per condition"), shots
            assert "arch=resnet vs cnn" in note and "pokestudy report --study smoke" in note, shots
            assert re.search(r"gap [-+]\d+\.\d points \[[-+]\d+\.\d, [-+]\d+\.\d\]", note), f"intervals; {shots}"
            measures = " ".join(summary.IMPORTANCE.replace("*", "").split()[:12])
            assert measures in " ".join(note.split()), f"what the importance chart measures; {shots}"
            assert page.locator("img[src^='/artifacts/']").count() >= 4, f"figures inline; {shots}"
            page.wait_for_function("[...document.querySelectorAll(\"img[src^='/artifacts/']\")]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            figure = page.request.get(base + page.get_by_role("link", name="gap.png").get_attribute("href"))
            assert figure.ok and figure.headers["content-type"] == "image/png", "figures open full-size from the note"
            browser.close()
    finally:
        stop(server)
