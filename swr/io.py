"""Atomic file output: write to a temporary file in the same folder, then rename.

A crash or Ctrl-C never leaves a half-written result behind; the previous file, if
any, stays intact until the new one is complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG atomically, then close it if pyplot holds it.

    Library plots are :class:`matplotlib.figure.Figure` objects, which render to PNG
    without pyplot or a backend choice, so the caller's backend (a notebook's) is left alone.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: free it there
        import matplotlib.pyplot as plt

        plt.close(fig)


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """Write ``rows`` as CSV atomically: ``columns`` (default: the first row's keys) in
    order, other keys left out; no rows and no columns give an empty file."""
    buf = io.StringIO()
    columns = columns if columns is not None else (list(rows[0]) if rows else None)
    if columns is not None:
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_text(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    from .errors import SwrError

    path = Path(path)
    if not path.is_file():
        raise SwrError(f"{what} not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SwrError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep, huge numbers
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SwrError(f"{what} {path} is not valid JSON ({reason}); regenerate it") from None


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite the header of safetensors file ``path`` with its ``__metadata__`` keys sorted.

    safetensors writes the metadata in hash-map order, which changes from call to call;
    sorted, the same tensors and metadata always give the same bytes. Compact JSON is
    never longer than the header safetensors wrote, so the tensors stay where they are.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header},
                          separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text.ljust(n))  # padded with spaces, as safetensors pads


def cache_dir(*parts: str) -> Path:
    """``$SWR_CACHE`` (default ``~/.cache/swr``) joined with ``parts``: the one rule for
    where generated suites, pretrained checkpoints and supernets are cached."""
    env = os.environ.get("SWR_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "swr"
    return root.joinpath(*parts)
