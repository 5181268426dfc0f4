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
