"""Atomic file output: write to a temporary file in the same folder, then rename.

A crash or Ctrl-C never leaves a half-written result behind; the previous file, if
any, stays intact until the new one is complete. A command that writes a folder of
files (a checkpoint, a fine-tuned run, a folded model) writes them all into a staged
folder that replaces the old one at the end (:func:`staged_folder`), and refuses an
output that is, lies inside or holds one of its inputs (:func:`check_output`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    An ``OSError`` while writing (a full disk, a quota, a read-only file system) is
    raised again naming ``path``, the file being written, not the temporary file or
    the file being copied from (:func:`writing_error`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise writing_error(e, path, None) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp makes the file private (0600); give it the mode a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
        except OSError as e:
            raise writing_error(e, path, tmp_path) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: errno values that mean the write itself failed, whatever file the error names
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def writing_error(e: OSError, path: str | os.PathLike, tmp: str | os.PathLike | None
                  ) -> OSError:
    """``e`` naming ``path``, the file being written, when it is an error of writing it:
    one naming the temporary file ``tmp`` (or none), or a full disk, quota or read-only
    file system (``shutil.copyfile`` names its source even then). Any other error (an
    input that cannot be read) is returned as it is."""
    named = {str(n) for n in (e.filename, e.filename2) if n is not None}
    ours = not named or (tmp is not None and str(tmp) in named) or str(path) in named
    if not (ours or e.errno in _WRITE_ERRNOS) or named == {str(path)}:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


@contextlib.contextmanager
def left_as_found_on_refusal(out: str | os.PathLike, results: tuple[str, ...] = ()
                             ) -> Iterator[None]:
    """A command refused (:class:`~swr.errors.SwrError`) leaves folder ``out`` as it found
    it: the entries it made there (a fingerprint, a lock, empty folders) are removed,
    and ``out`` itself when the command made it. Once one of ``results`` (the files
    that hold finished work, kept for ``--resume``) has been made, everything stays.
    A lost cluster (exit 75, work kept for ``--resume``) is not a refusal. Enter it with
    :func:`out_lock` held, so that only this command's entries can be taken back."""
    from .errors import ClusterLostError, SwrError

    out = Path(out)
    before = set(os.listdir(out)) if out.is_dir() else None
    try:
        yield
    except SwrError as e:
        if not isinstance(e, ClusterLostError):
            made = (set(os.listdir(out)) if out.is_dir() else set()) - (before or set())
            if not made & set(results):
                for name in made:
                    path = out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            path.unlink()
                if before is None:
                    with contextlib.suppress(OSError):
                        out.rmdir()
        raise


def check_output(out: str | os.PathLike, inputs: dict[str, Any], option: str = "--out",
                 replaced: bool = True) -> Path:
    """Refuse an output that is or lies inside one of the ``inputs`` (or holds one).

    ``inputs`` maps what the user typed to name an input (``--checkpoint``, ``--task``,
    ``the selection's checkpoint``) to its path (None or "" for an input not given).
    ``replaced``: ``out`` is a folder replaced whole (:func:`staged_folder`), so it may
    not hold an input either. Paths are compared with symlinks resolved, so a link
    cannot hide that a run would overwrite the base model it reads. Returns ``out``
    resolved.
    """
    from .errors import SwrError

    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None or str(path) == "":
            continue
        source = Path(path).resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "lies inside"
            raise SwrError(f"{option} {out} {where} the input {what} {path}; writing there would "
                           "overwrite it: choose another output folder")
        if replaced and target in source.parents:
            raise SwrError(f"{option} {out} holds the input {what} {path}, which writing the "
                           "outputs would replace: choose another output folder")
    return target


def check_run_folder(out: str | os.PathLike, outputs: set[str], option: str = "--out") -> None:
    """Refuse an existing ``out`` that holds anything but the files in ``outputs``.

    :func:`staged_folder` replaces ``out`` whole; call this before long work so that
    a folder of other files is refused at once, not after the training.
    """
    from .errors import SwrError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SwrError(f"{option} {out} is a file; give a folder")
    if out.is_dir():
        # hidden *.tmp files are what an interrupted atomic write leaves behind; .lock is
        # the lock of the command writing the folder (:func:`out_lock`)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in outputs
                         and p.name != LOCK_FILE
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if foreign:
            raise SwrError(f"{option} {out} holds files this command does not write "
                           f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                           "replacing the folder would lose them: choose a new or empty folder")


def check_rerun(out: str | os.PathLike, command: str, markers: "set[str] | tuple[str, ...]",
                resume: bool = False, overwrite: bool = False, option: str = "--out",
                resumable: bool = False) -> None:
    """Refuse an ``out`` that holds an earlier run, unless ``resume`` or ``overwrite``.

    The one rule for every command that writes a run folder: a folder holding any of
    ``markers`` (the files a finished or started run of ``command`` leaves) is another
    run, and replacing it silently would lose it. ``--resume`` (where ``resumable``)
    continues it after the caller's fingerprint check; ``--overwrite`` replaces it.
    """
    from .errors import SwrError

    out = Path(out)
    if resume or overwrite or not out.is_dir():
        return
    found = sorted(m for m in markers if (out / m).exists())
    if found:
        how = "--resume to continue it, --overwrite to replace it" if resumable \
            else "--overwrite to replace it"
        raise SwrError(f"{option} {out} holds an earlier swr {command} run ({found[0]}); pass "
                       f"{how}, or choose another {option}")


@contextlib.contextmanager
def run_folder(out: str | os.PathLike, command: str, outputs: set[str],
               overwrite: bool = False, option: str = "--out") -> Iterator[Path]:
    """Lock ``out``, refuse it if it holds an earlier run (unless ``overwrite``), and
    yield a staged folder that replaces it once the run has written everything.

    Everything the run writes, its live logs included (``epochs.csv``, TensorBoard
    events), goes to the staged folder, so an interrupted or failed run leaves ``out``
    exactly as it was: all new or all old. See :func:`out_lock`, :func:`check_rerun`,
    :func:`staged_folder`.
    """
    with out_lock(out, command, option):
        check_rerun(out, command, outputs, overwrite=overwrite, option=option)
        with staged_folder(out, outputs, option) as stage:
            yield stage


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, outputs: set[str],
                  option: str = "--out", carry: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success it becomes ``out``.

    A run writes all its files there; only when every one is complete is the old
    ``out`` (if any) moved aside, the new folder renamed onto ``out`` and the old one
    deleted. A failure on the way (a full disk, Ctrl-C) deletes the temporary folder
    and leaves ``out`` as it was, so a run folder never mixes files of two runs.
    ``outputs`` names every file the command may write (see :func:`check_run_folder`).
    ``carry`` names entries the run wrote into ``out`` itself while it ran (live
    training logs, so they can be watched): they move into the new folder at the swap.
    An ``OSError`` while writing is raised again naming ``out``.
    """
    given = out
    out = Path(out).resolve()  # a symlinked folder is replaced where it really lies
    check_run_folder(out, outputs, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".new", dir=out.parent))
    try:
        try:
            yield stage
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e} while writing {option}, which is left "
                          "as it was", str(given)) from e
        umask = os.umask(0)  # mkdtemp makes the folder private (0700); give it mkdir's mode
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        # the lock moves with the folder: the same file (inode) stays locked at out/.lock
        for name in (*carry, LOCK_FILE):
            if (out / name).exists() and not (stage / name).exists():
                os.replace(out / name, stage / name)
        _swap_in(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, out: Path) -> None:
    """Rename ``stage`` onto ``out``, moving an existing ``out`` aside first and then deleting it."""
    if not out.is_dir():
        try:
            os.replace(stage, out)
            return
        except OSError as e:
            # another process made ``out`` meanwhile (two runs of one cached checkpoint)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old)  # onto the empty folder mkdtemp reserved
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def safetensors_os_error(e: Exception, path: str | os.PathLike) -> OSError:
    """The ``OSError`` behind a safetensors write error (a full disk), naming ``path``.

    safetensors reports I/O failures as ``SafetensorError`` text such as
    ``IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })``.
    """
    import re

    text = str(e)
    code = re.search(r"code: (\d+)", text)
    message = re.search(r'message: "([^"]*)"', text)
    errno_ = int(code.group(1)) if code else None
    strerror = message.group(1) if message else " ".join(text.split())[:200]
    return OSError(errno_, strerror, str(path))


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


def save_safetensors(tensors: dict, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (and string ``metadata``) to safetensors file ``path``: atomically,
    byte-reproducibly (metadata keys sorted), a full disk raised as an OSError naming
    ``path``. Returns the file's size in bytes. The one writer for every safetensors
    file swr keeps, so the same content always gives the same bytes."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # a full disk, reported as text
            raise safetensors_os_error(e, path) from None
        if metadata:
            sort_safetensors_metadata(tmp)
    return Path(path).stat().st_size


def cache_dir(*parts: str) -> Path:
    """``$SWR_CACHE`` (default ``~/.cache/swr``) joined with ``parts``: the one rule for
    where generated suites, pretrained checkpoints and supernets are cached."""
    env = os.environ.get("SWR_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "swr"
    return root.joinpath(*parts)


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files could not be written into ``folder`` (made if missing), or ``None``.

    Checked without writing anything: the nearest existing folder on the way must be
    a folder this process may write into. Lets a command refuse an unusable output
    or cache folder before hours of training instead of at the final write.
    """
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user (or is on a read-only file system)"
    return None


_HELD_LOCKS: dict[Path, int] = {}

#: the lock file :func:`out_lock` holds inside the folder a command writes
LOCK_FILE = ".lock"


@contextlib.contextmanager
def out_lock(out: str | os.PathLike, command: str, option: str = "--out",
             wait: float = 0.0) -> Iterator[Path]:
    """Hold an exclusive lock on folder ``out`` (``out/.lock``) while a command writes it.

    A second process that tries to write the same folder is refused at once with one
    line (two searches appending to one log would lose one of them). The lock is an
    ``fcntl.flock`` on ``.lock``, so the system releases it when the process ends,
    even when killed. On a normal exit ``.lock`` is removed again, and ``out`` too if
    this call made it and nothing else was written (a command refused early leaves
    nothing behind). Re-entrant within one process (a command's library call nested
    in the command). Raises :class:`SwrError` when another process holds it for more
    than ``wait`` seconds (short edits, such as a task store's, wait their turn).
    """
    import fcntl
    import time

    from .errors import SwrError

    folder = Path(out).resolve()
    if folder in _HELD_LOCKS:
        _HELD_LOCKS[folder] += 1
        try:
            yield folder
        finally:
            _HELD_LOCKS[folder] -= 1
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    deadline = time.monotonic() + wait
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if time.monotonic() < deadline:
                f.close()
                time.sleep(0.1)
                continue
            f.seek(0)
            holder = f.read().strip()[:40] or "unknown"
            f.close()
            if made:  # made for nothing: leave no trace
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise SwrError(f"{option} {out} is in use by another running swr {command} (process "
                           f"{holder}, holding {path}); wait for it to finish or choose another "
                           f"{option}") from None
        # the holder before us may have removed the file between our open and our lock:
        # then we hold a lock on a file no one else will find; take the one at ``path``
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD_LOCKS[folder] = 1
        try:
            yield folder
        finally:
            del _HELD_LOCKS[folder]
            with contextlib.suppress(OSError):
                path.unlink()  # still held, so no one can take the removed file meanwhile
                if made and not any(folder.iterdir()):
                    folder.rmdir()
    finally:
        f.close()  # releases the lock
