"""Progress bars in a log file: a few lines, not one per step."""

import io

from swr import progress


def test_a_bar_writes_few_lines_to_a_log(monkeypatch):
    clock = iter(range(0, 10_000, 1))  # one second per write
    monkeypatch.setattr(progress, "_now", lambda: float(next(clock)))
    log = io.StringIO()
    bar = progress.progress_bar(1000, "train", "batch", file=log, mininterval=0, miniters=1)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    # the first line, one every 30 s of (fake) clock, the last: not 1000
    assert 3 <= len(lines) <= 2 * (1000 // 30), len(lines)
    assert "\r" not in log.getvalue() and lines[-1].startswith("train: 100%")


def test_a_bar_on_a_terminal_is_plain_tqdm():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = progress.progress_bar(10, "x", "it", file=out)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue()


def test_a_bench_bar_names_the_run_going_on_and_its_epoch(monkeypatch, tmp_path, capsys):
    """swr bench in-process: its bar of runs shows which run is going and the epoch its
    training is in; in a log, spaced as every bar's lines are."""
    import itertools

    import swr.tasks
    from swr.app.bench import BenchConfig, run_bench

    from fixtures import tiny_audio_task, tiny_checkpoint

    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    clock = itertools.count(0, 31)  # every write 31 s after the last: the log keeps each
    monkeypatch.setattr(progress, "_now", lambda: float(next(clock)))
    cfg = BenchConfig(tasks=["tiny"], checkpoint=str(tiny_checkpoint(tmp_path / "ckpt")),
                      methods=["norm", "bitfit"], budgets=["5%"], out=str(tmp_path / "b"),
                      seeds=1, epochs=2, workers=1, device="cpu")
    run_bench(cfg, log=lambda s: None)
    lines = capsys.readouterr().err.splitlines()
    for method in ("norm", "bitfit"):
        for epoch in (1, 2):
            assert any(f"tiny {method} natural s0: epoch {epoch}/2" in line
                       for line in lines), (method, epoch, lines)
    # the second run's lines carry the first's result beside them
    assert any("tiny bitfit natural s0: epoch" in line and "last norm@natural=" in line
               for line in lines), lines
    assert "\r" not in "".join(lines)


def test_a_bench_bar_in_a_log_writes_no_more_often_than_any_bar(monkeypatch, tmp_path, capsys):
    import swr.tasks
    from swr.app.bench import BenchConfig, run_bench

    from fixtures import tiny_audio_task, tiny_checkpoint

    task = tiny_audio_task()
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    monkeypatch.setattr(progress, "_now", lambda: 0.0)  # the clock stands still
    cfg = BenchConfig(tasks=["tiny"], checkpoint=str(tiny_checkpoint(tmp_path / "ckpt")),
                      methods=["norm"], budgets=["5%"], out=str(tmp_path / "b"),
                      seeds=1, epochs=3, workers=1, device="cpu")
    run_bench(cfg, log=lambda s: None)
    lines = capsys.readouterr().err.splitlines()
    # the bar's first line and its 100% ones (the last run's update, the close), none of
    # the epochs between
    assert len(lines) <= 3 and "epoch" not in lines[0] and "100%" in lines[-1], lines
    assert "last norm@natural=" in lines[-1]
