"""Great Expectations in a worker process of its own, so that its import overlaps the rest of ingest's start.

Importing GX takes 4–5 s of one core in a process of its own (pandas and scipy included: its expectations import
``scipy.stats``, its checkpoint actions ``altair``), the longest fixed cost of a small ingest, and Python imports hold
the GIL: in-process nothing else can run meanwhile. The ingest stage therefore starts this worker (a ``python -P -c``
bootstrap that calls :func:`main`: its own entry point, so nothing of the caller's ``__main__`` is imported again)
when it begins to run, sends it the delivery's rows at once and imports Beam and warms the measurement kernels while
the worker imports GX and checks them. The worker reads its requests from a thread that starts before the import,
so a caller's request of any size is taken at once (a pipe holds 64 KiB), and the caller writes each request from a
thread of its own. The worker answers each request with the ``ValidationReport`` first and renders the Data Docs
pages after, while ingest goes on; :meth:`ExpectationsWorker.wait_docs` waits for them.

The suites, the checkpoints and the reports are ``pipelines.stages.ingest.expectations``' (``check_in_worker``); the
same calls run in-process through ``validate_delivery`` and ``validate_curated``.

Protocol: over the worker's stdin and stdout, frames of an 8-byte big-endian length and a pickle. Requests are
``(kind, number, payload)``; answers ``("report", number, ValidationReport)``, then ``("docs", number, None)``, or
``("error", number, message, traceback)``. The worker writes nothing else to that stdout (its fd 1 goes to stderr,
which it shares with the caller), and exits at the end of its stdin: when the caller closes it or dies.

A process keeps at most one idle worker for ``IDLE_S`` seconds (``acquire`` / ``release``), so a process that runs
ingest many times (a test session, a Dagster code server) pays the GX import once, and a second ingest running at
the same time gets a worker of its own.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["IDLE_S", "ExpectationsWorker", "ExpectationsWorkerError", "acquire", "prestart", "release"]

IDLE_S = 600.0
"""Seconds an idle worker is kept for the process's next ingest before it is stopped."""

_HEADER = struct.Struct(">Q")


class ExpectationsWorkerError(RuntimeError):
    """The worker failed a request (the message holds its error and traceback) or exited without answering."""


def _write(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    """The next frame's object; None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class ExpectationsWorker:
    """One GX worker process and the conversation with it (one caller at a time: see ``acquire``).

    Usage::

        number = worker.submit("delivery", {"tables": {...}, "run_dir": str(run_dir)})
        ...                                  # other work while the worker imports GX and checks
        report = worker.report(number)       # blocks until the report is in
        worker.wait_docs()                   # blocks until every request's Data Docs are written
    """

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[3])  # the folder holding ``pipelines`` (a checkout, site-packages)
        # -P: the working directory is not put on sys.path (a `pipelines` folder of the caller's is not imported);
        # the package's folder goes last, so it never shadows the standard library
        bootstrap = (f"import sys; sys.path.append({root!r}); "
                     f"from {__name__} import main; main()")
        self.process = subprocess.Popen([sys.executable, "-P", "-c", bootstrap], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env={**os.environ, "GX_ANALYTICS_ENABLED": "false"})
        self._number = 0
        self._reports: dict[int, Any] = {}
        self._docs_pending: set[int] = set()
        self._writer: threading.Thread | None = None
        self._send_error: BaseException | None = None
        self._broken = False  # the conversation is out of step (a failed write or read): never reused

    @property
    def alive(self) -> bool:
        return not self._broken and self.process.poll() is None

    def submit(self, kind: str, payload: Mapping[str, Any]) -> int:
        """Send a request (``check_in_worker``'s ``kind`` and ``payload``); returns its number for :meth:`report`.

        The frame is written by a thread of its own, so the caller goes on at once whatever the request's size.

        Raises:
            ExpectationsWorkerError: the worker has exited.
        """
        self._join_writer()  # requests go out in order (the worker reads them as they come)
        self._number += 1
        self._docs_pending.add(self._number)  # outstanding from here: a worker interrupted now is never reused
        data = pickle.dumps((kind, self._number, dict(payload)), protocol=pickle.HIGHEST_PROTOCOL)
        self._writer = threading.Thread(target=self._send, args=(_HEADER.pack(len(data)) + data,),
                                        name="gx-worker-request", daemon=True)
        self._writer.start()
        return self._number

    def _send(self, frame: bytes) -> None:
        try:
            self.process.stdin.write(frame)
            self.process.stdin.flush()
        except (OSError, ValueError) as error:  # BrokenPipeError; ValueError: the pipe was closed
            self._send_error = error

    def _join_writer(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._send_error is not None:
            error, self._send_error = self._send_error, None
            raise self._gone() from error

    def report(self, number: int) -> Any:
        """The ``ValidationReport`` of request ``number``, waiting for it.

        Raises:
            ExpectationsWorkerError: the request failed in the worker, or the worker exited first.
        """
        while number not in self._reports:
            self._receive()
        return self._reports.pop(number)

    def wait_docs(self) -> None:
        """Wait until the worker has written the Data Docs of every request.

        Raises:
            ExpectationsWorkerError: rendering failed in the worker, or the worker exited first.
        """
        while self._docs_pending:
            self._receive()
        self._join_writer()

    @property
    def idle(self) -> bool:
        """No request is outstanding: the worker can serve another caller."""
        return not self._docs_pending and not self._reports

    def _receive(self) -> None:
        try:
            message = _read(self.process.stdout)
        except BaseException:  # interrupted mid-frame: the next read would start inside it
            self._broken = True
            raise
        if message is None:
            if self._writer is not None:
                self._writer.join()  # it ends too: the pipe is broken
            raise self._gone()
        kind, number = message[0], message[1]
        if kind == "report":
            self._reports[number] = message[2]
        elif kind == "docs":
            self._docs_pending.discard(number)
        else:  # error
            self._docs_pending.discard(number)
            raise ExpectationsWorkerError(f"Great Expectations failed in its worker: {message[2]}\n{message[3]}")

    def _gone(self) -> ExpectationsWorkerError:
        self._broken = True
        self._docs_pending.clear()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return ExpectationsWorkerError(f"the Great Expectations worker (pid {self.process.pid}) exited with code "
                                       f"{code} before answering; its errors are on stderr above")

    def close(self) -> None:
        """End the worker now: close its stdin and terminate it (whatever it was doing is no longer wanted: the
        caller has its reports, or failed); kill it if that takes 5 s."""
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_lock = threading.Lock()
_idle: ExpectationsWorker | None = None
_idle_timer: threading.Timer | None = None


def acquire() -> ExpectationsWorker:
    """The process's idle worker if it has a live one, else a new one (which starts importing GX at once)."""
    global _idle, _idle_timer
    with _lock:
        worker, _idle = _idle, None
        if _idle_timer is not None:
            _idle_timer.cancel()
            _idle_timer = None
    if worker is not None and worker.alive:
        return worker
    if worker is not None:
        worker.close()
    return ExpectationsWorker()


def prestart() -> None:
    """Start a worker now and keep it as the process's idle worker, for a command about to run ingest: GX's import
    then overlaps the command's own start. Unused, it is stopped after ``IDLE_S`` s or when the process exits."""
    release(acquire())


def release(worker: ExpectationsWorker) -> None:
    """Give ``worker`` back after use: kept as the process's idle worker for ``IDLE_S`` seconds when it is alive
    and has nothing outstanding (and no other is kept), else closed."""
    global _idle, _idle_timer
    keep = worker.alive and worker.idle
    with _lock:
        if keep and _idle is None:
            _idle = worker
            _idle_timer = threading.Timer(IDLE_S, _stop_idle, args=(worker,))
            _idle_timer.daemon = True
            _idle_timer.start()
            return
    worker.close()


def _stop_idle(worker: ExpectationsWorker | None = None) -> None:
    """Close the idle worker (``worker``: only if it is still the idle one)."""
    global _idle, _idle_timer
    with _lock:
        if _idle is None or (worker is not None and _idle is not worker):
            return
        stopping, _idle, _idle_timer = _idle, None, None
    stopping.close()


def _forget_idle() -> None:
    """In a child made by ``os.fork``: the parent's idle worker is the parent's (its pipes are shared, not owned)."""
    global _lock, _idle, _idle_timer
    _lock, _idle, _idle_timer = threading.Lock(), None, None


atexit.register(_stop_idle)
os.register_at_fork(after_in_child=_forget_idle)


def main() -> None:
    """The worker: take requests from stdin as they come (a reader thread, started before GX's import), import GX and
    build its context, then answer the requests in order until stdin ends."""
    import queue
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the caller, which ends this worker
    channel = os.fdopen(os.dup(1), "wb")  # the protocol's; anything printed goes to stderr
    os.dup2(2, 1)
    requests: queue.Queue[Any] = queue.Queue()

    def read_requests() -> None:
        while True:
            request = _read(sys.stdin.buffer)
            requests.put(request)
            if request is None:
                return

    threading.Thread(target=read_requests, name="gx-worker-requests", daemon=True).start()
    from pipelines.stages.ingest.expectations import _validator, check_in_worker

    _validator()  # the GX context, the suites and the checkpoints, before the first request is taken
    while (request := requests.get()) is not None:
        kind, number, payload = request
        step = "check"
        try:
            report, build_docs = check_in_worker(kind, payload)
            step = "answer"
            _write(channel, ("report", number, report))
            step = "docs"
            build_docs()
        except Exception as error:  # noqa: BLE001 (sent to the caller, which raises it)
            _write(channel, ("error", number, f"{type(error).__name__} ({step}): {error}", traceback.format_exc()))
            continue
        _write(channel, ("docs", number, None))


if __name__ == "__main__":
    main()
