"""Starting, joining and sizing Ray for parallel workers (search scoring, rollouts, bench runs).

``init_ray()`` starts a quiet local instance (the default on a laptop or CI box) or
joins a cluster (``--ray-address``); it does nothing when Ray is already running, so
library code can call it unconditionally. ``resolve_workers`` is the one rule for
how many workers a command starts (never more than the CPUs it can use);
``worker_threads`` and ``limit_threads`` keep N workers from each starting one
PyTorch thread per core and oversubscribing the machine.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import ray
import torch

from swr.errors import SwrError, handle_sigterm

# A local instance only ships small observations and env factories; Ray's default
# (30% of RAM) would reserve gigabytes of shared memory for nothing.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2
# How long to wait for a cluster's head to accept a TCP connection: Ray's own
# connect loop retries for minutes before giving up.
PROBE_TIMEOUT_S = 5.0
# How long to wait for what accepted the connection to answer like a Ray head (gRPC);
# a server of another kind (an HTTP server) would otherwise leave ray.init waiting.
HANDSHAKE_TIMEOUT_S = 5.0

_started_here = False


def local_cpus() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. in containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_cpus() -> int:
    """CPUs that parallel workers can use: those of the Ray instance or cluster this
    process runs on, else the cores this process may run on (:func:`local_cpus`, which
    is what a local instance started by :func:`init_ray` gets)."""
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return local_cpus()


def resolve_workers(requested: int | None, address: str | None = None,
                    option: str = "--workers") -> int:
    """How many parallel workers to start: the one rule every command uses.

    ``None`` (the option's default) means one per available CPU; ``0`` or less is
    returned unchanged (0: no Ray; callers refuse negatives). A request above the
    CPUs available is reduced to them, with a one-line notice on stderr: each worker
    reserves a CPU, so more would wait forever for one (or pile up processes and
    memory). The CPUs are those of the cluster at ``address`` (joined here, so an
    unreachable one fails now, before any training) or of a running Ray instance,
    else the cores this process may run on (its CPU affinity, e.g. under
    ``taskset`` or a container's CPU set, not the machine's count).

    Raises:
        SwrError: the cluster at ``address`` cannot be reached.
    """
    if requested is not None and requested <= 0:
        return requested
    if address is not None:
        init_ray(address)
    cap = available_cpus()
    if requested is None:
        return cap
    if requested > cap:
        where = ("of the Ray cluster" if ray.is_initialized() and not _started_here
                 else "this process may use")
        print(f"swr: {option} {requested} is more than the {cap} CPU(s) {where}; "
              f"starting {cap} worker(s)", file=sys.stderr)
        return cap
    return requested


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = None) -> None:
    """Make sure Ray is running: join ``address`` or start a quiet local instance.

    Args:
        address: a cluster's head (``host:port``, ``ray://host:port`` or ``auto``);
            ``None`` starts a local instance.
        num_cpus: CPUs a local instance offers (default: this machine's cores).
        object_store_memory: bytes of shared memory for a local instance (default
            200 MB).

    Raises:
        SwrError: the cluster at ``address`` cannot be reached.
    """
    global _started_here
    if ray.is_initialized():
        return
    if not logging.getLogger("swr").isEnabledFor(logging.DEBUG):
        # Ray's notices on every start (token authentication on or off, for a local
        # instance of this process alone) are not the user's business unless --debug
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
             "logging_level": logging.WARNING}
    if address is not None:
        hint = "start it with `ray start --head` or drop --ray-address"
        # Ray's C++ client writes a warning per retry straight to file descriptor 2
        # (a refused token among them): held back, and read to tell why it failed
        check_head(address)  # in seconds, not after Ray's minutes of retries
        held = _stderr_held()
        try:
            with held:
                ray.init(address=address, **quiet)
            handle_sigterm(again=True)  # ray.init installed one that exits mid-write
        except Exception as e:
            if _auth_refused(e, held.text):
                raise SwrError(
                    f"the Ray cluster at {address} refused this process: it uses token "
                    "authentication; set RAY_AUTH_MODE=token (and its token: RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) here and rerun") from None
            if not isinstance(e, (OSError, ConnectionError, RuntimeError)):
                raise
            raise SwrError(f"cannot reach Ray cluster at {address}: {e}; {hint}") from None
        return
    # "local": a new instance even when `ray start` left one running on this machine
    # (Ray would otherwise join it, and refuse the num_cpus given here)
    ray.init(address="local", num_cpus=num_cpus or local_cpus(),
             object_store_memory=object_store_memory or LOCAL_OBJECT_STORE_BYTES, **quiet)
    handle_sigterm(again=True)  # ray.init installed one that exits mid-write
    _started_here = True


class _stderr_held:
    """Redirect file descriptor 2 (C and C++ code included) to a temporary file while
    in the block; ``text`` holds what was written. Replayed to stderr when the block
    succeeds, so nothing is lost on success."""

    def __init__(self):
        self.text = ""

    def __enter__(self):
        import tempfile

        self._file = tempfile.TemporaryFile(mode="w+b")
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, kind, error, tb):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        if kind is None and self.text:
            sys.stderr.write(self.text)
        return False


def _auth_refused(error: BaseException, stderr_text: str) -> bool:
    """Whether joining a cluster failed because it wants an authentication token.

    Ray raises ``AuthenticationError`` for some paths; for others it only retries
    with "Unauthenticated ... InvalidAuthToken" warnings and then reports a plain
    connection failure, so the held-back warnings are read too.
    """
    auth_error = getattr(ray.exceptions, "AuthenticationError", None)
    if auth_error is not None and isinstance(error, auth_error):
        return True
    text = f"{error}\n{stderr_text}".lower()
    return "unauthenticated" in text or "invalidauthtoken" in text


def shutdown_ray() -> None:
    """Stop Ray if :func:`init_ray` started it; leave a joined cluster or a caller's instance alone."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def worker_threads(n_workers: int) -> int:
    """PyTorch threads per worker so that ``n_workers`` workers share the cores without oversubscription."""
    cpus = local_cpus()
    if ray.is_initialized():
        # A local instance may have been started with fewer CPUs than the machine has.
        cpus = min(cpus, int(ray.cluster_resources().get("CPU", cpus)))
    return max(1, cpus // max(1, n_workers))


def limit_threads(n_threads: int) -> None:
    """Called by a worker when it starts: cap its PyTorch intra-op threads."""
    torch.set_num_threads(max(1, int(n_threads)))


def cluster_alive(timeout: float = 2.0) -> bool:
    """Whether the Ray cluster this process joined still answers at its head (GCS),
    and the Ray node on this machine that it works through is still up.

    TCP connections to the head's GCS port and the local node's port, so it answers
    within ``timeout`` even when Ray's own clients would keep retrying for a minute.
    True when an address cannot be told (e.g. through Ray Client): unknown is not dead.
    """
    return lost_reason(timeout) is None


def lost_reason(timeout: float = 2.0) -> str | None:
    """Why this process can no longer use its Ray cluster (``None`` while it can).

    A dead local node (its raylet killed, or out of memory) matters as much as a
    dead head: Ray ends the driver with status 1 a few seconds later, so a caller
    that checks this first can stop cleanly (and keep its work) instead.
    """
    if not ray.is_initialized():
        return "Ray is not running"
    try:
        _probe(cluster_address(), timeout)
    except OSError:
        return "its head no longer answers"
    try:
        node = ray._private.worker.global_worker.node
        host, port = node.node_ip_address, node.node_manager_port
    except Exception:  # Ray Client, or Ray's internals moved: cannot tell
        return None
    if host and port:
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError:
            return "the Ray node on this machine died"
    return None


def cluster_address() -> str:
    """The head address of the Ray cluster this process joined ('' when none)."""
    try:
        return (ray.get_runtime_context().gcs_address or "") if ray.is_initialized() else ""
    except AttributeError:
        return ""


def check_ray_address(address: str, option: str = "--ray-address") -> str:
    """``address`` if it has the form of a Ray head's address: ``host:port`` (the head's
    GCS port, as ``ray start --head`` prints it), ``ray://host:port`` (Ray Client) or
    ``auto``; else :class:`SwrError` naming it. Checks the form only (no connection)."""
    fix = (f"give the head's host:port as `ray start --head` prints it (e.g. 10.0.0.5:6379), "
           f"ray://host:port or auto, or drop {option}")
    if address == "auto":
        return address
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme not in ("", "ray"):
        raise SwrError(f"{option} {address!r}: {scheme}:// is not a Ray address; {fix}")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or any(c in host for c in "/?#@ ") or not (
            port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise SwrError(f"{option} {address!r} is not of the form host:port with a port from "
                       f"1 to 65535; {fix}")
    return address


def check_head(address: str, option: str = "--ray-address") -> None:
    """:class:`SwrError` (one line) unless ``address`` has a Ray head's form
    (:func:`check_ray_address`), accepts a TCP connection within
    :data:`PROBE_TIMEOUT_S` and answers like a Ray head within
    :data:`HANDSHAKE_TIMEOUT_S`. Called before any work, so a wrong address costs
    seconds; ``auto`` is left to Ray."""
    check_ray_address(address, option)
    if address == "auto":
        return
    try:
        _probe(address)
    except OSError as e:
        raise SwrError(f"cannot reach Ray cluster at {address}: {e}; start it with "
                       f"`ray start --head` or drop {option}") from None
    _check_head_answers(address, option=option)


def _check_head_answers(address: str, timeout: float = HANDSHAKE_TIMEOUT_S,
                        option: str = "--ray-address") -> None:
    """:class:`SwrError` unless what listens at ``address`` speaks HTTP/2 as a Ray head's
    gRPC server does: it answers a client preface with a SETTINGS frame. Anything else
    (an HTTP/1 server, silence) is named in the line instead of leaving ``ray.init``
    waiting for minutes. ``auto`` is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9))  # + empty SETTINGS
            reply = b""
            while len(reply) < 9:
                chunk = conn.recv(256)
                if not chunk:
                    break
                reply += chunk
    except socket.timeout:
        reply = None
    except OSError as e:
        raise SwrError(f"cannot reach Ray cluster at {address}: {e}; start it with "
                       f"`ray start --head` or drop {option}") from None
    if reply is not None and len(reply) >= 9 and reply[3] == 0x04:  # an HTTP/2 SETTINGS frame
        return
    if reply is None:
        seen = f"it accepted a connection but sent nothing within {timeout:g} s"
    elif not reply:
        seen = "it closed the connection without a word"
    else:
        text = reply.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        shown = "".join(c if c.isprintable() else "?" for c in text)[:60]
        head = reply[:512].lower()
        web = reply[:5] == b"HTTP/" or b"<html" in head or b"<!doctype html" in head
        seen = f"{'an HTTP server' if web else 'it'} answered {shown!r}"
    raise SwrError(f"{option} {address}: what listens there is not a Ray head ({seen}); "
                   "give the GCS address `ray start --head` printed (default port 6379)")


def _probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (``OSError``) when a ``host:port`` address does not accept connections.

    ``auto`` and anything not shaped ``[scheme://]host:port`` is left to Ray to resolve.
    """
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    socket.create_connection((host, int(port)), timeout=timeout).close()
