"""Console: the progress reporter, colour rules, Ray's worker lines routed to a file."""

from __future__ import annotations

import io
import time

import pytest

from lotscan.platform import console
from lotscan.platform.console import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_prints_a_line_every_n_seconds_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress(100, unit="img", desc="[lotscan score] scoring", every_s=10, stream=out,
                 tty=False, clock=clock)
    clock.t += 4
    p.update(20)  # 4 s < 10 s: no line yet
    assert out.getvalue() == ""
    clock.t += 6
    p.update(5)  # 25 images in 10 s: 2.5 img/s, 75 left: ETA 30 s
    assert out.getvalue() == (
        "[lotscan score] scoring: 25/100 img (25%), 2.5 img/s, elapsed 10s, ETA 30s\n")
    clock.t += 30
    p.update(75)
    p.close()
    p.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[lotscan score] scoring: 100/100 img (100%), 2.5 img/s, in 40s"
    assert len(lines) == 3
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_eta_is_the_time_budget_when_it_ends_first():
    clock, out = Clock(), io.StringIO()
    p = Progress(400, unit="step", desc="train", budget_s=180, stream=out, tty=False, clock=clock)
    clock.t += 60
    p.update(60)  # 1 step/s: 340 steps would take 340 s, the budget ends in 120 s
    assert p.eta() == (120.0, "budget")
    assert p.line().endswith("ETA 2m00s (time budget)")
    clock.t += 10
    p.update(40)
    q = Progress(100, unit="step", budget_s=1000, stream=out, tty=False, clock=clock)
    clock.t += 10
    q.update(50)  # 50 left at 5/s: 10 s, well before the budget
    assert q.eta() == (10.0, "rate")
    unknown = Progress(None, unit="img", stream=out, tty=False, clock=clock)
    assert unknown.eta() == (None, "") and "ETA" not in unknown.line()
    for bar in (p, q, unknown):
        bar.close()


def test_terminal_progress_draws_a_tqdm_bar_and_echo_keeps_it_intact():
    out = io.StringIO()
    with Progress(10, unit="img", desc="scoring", stream=out, tty=True) as p:
        p.update(4)
        console.echo("[lotscan train] a line from a worker", stream=out)
        p.update(6)
    text = out.getvalue()
    assert "scoring" in text and "10/10" in text and "img/s" in text
    assert "[lotscan train] a line from a worker\n" in text
    assert console._active == []


def test_budget_bar_shows_its_eta():
    out = io.StringIO()
    with Progress(400, unit="step", desc="train", budget_s=0.0, stream=out, tty=True) as p:
        p.update(1)  # the budget is spent: it ends the run, not the step count
    assert "ETA 0s (time budget)" in out.getvalue()


def test_durations_and_colour_rules(monkeypatch):
    assert [format_duration(s) for s in (0, 42.4, 185, 7620, None, float("nan"))] == [
        "0s", "42s", "3m05s", "2h07m", "?", "?"]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert console.use_colour(Tty()) is True
    assert console.use_colour(io.StringIO()) is False  # a file or pipe: never colour
    monkeypatch.setenv("NO_COLOR", "1")
    assert console.use_colour(Tty()) is False


def test_verbose_switch_and_log_path(monkeypatch, tmp_path):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.verbose() is False
    console.set_verbose(True)
    assert console.verbose() is True
    console.set_verbose(False)
    assert console.verbose() is False
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    path = console.log_path("ray")
    assert path.startswith(str(tmp_path / "logs")) and path.endswith(".log")


def test_worker_line_filter_keeps_lotscan_lines_once_and_files_everything(capsys):
    from lotscan.platform.runtime import WorkerLineFilter

    clock, log = Clock(), io.StringIO()
    handler = WorkerLineFilter(log, clock=clock)
    batch = {"pid": 7, "actor_name": "RayTrainWorker", "lines": [
        "\x1b[36mStarting execution of Dataset train_1\x1b[0m",
        "[lotscan train] denoiser: step 25/400 loss 0.5",
    ]}
    handler(batch)
    handler({**batch, "lines": batch["lines"][1:]})  # the same line again on stderr: dropped
    clock.t += 10
    handler({**batch, "lines": batch["lines"][1:]})  # later: a new report, printed
    out = capsys.readouterr().out.splitlines()
    assert out == ["[lotscan train] denoiser: step 25/400 loss 0.5"] * 2
    filed = log.getvalue().splitlines()
    assert len(filed) == 4 and "\x1b" not in log.getvalue()
    assert filed[0] == "(RayTrainWorker pid=7) Starting execution of Dataset train_1"


@pytest.mark.slow
@pytest.mark.ray
def test_ray_worker_output_goes_to_the_log_file(ray_local, capsys):
    import ray

    from lotscan.platform.runtime import ray_log_file

    path = ray_log_file()
    if path is None:
        pytest.skip("this session's Ray was started verbose")  # LOTSCAN_VERBOSE=1 in the env

    @ray.remote
    def chatty(tag: str) -> None:
        print(f"ray internals {tag}")
        print(f"[lotscan test] visible {tag}", flush=True)

    tag = str(time.time_ns())
    ray.get(chatty.remote(tag))
    deadline = time.monotonic() + 20
    seen = ""
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8") as f:
            seen = f.read()
        if f"visible {tag}" in seen:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    assert f"ray internals {tag}" in seen and f"[lotscan test] visible {tag}" in seen
    out = capsys.readouterr().out
    assert f"[lotscan test] visible {tag}" in out
    assert f"ray internals {tag}" not in out
