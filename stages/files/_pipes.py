"""Reading a stream (stdin, a pipe, a FIFO, a character device) so that a stop is never stuck.

A regular file answers every read at once, so the sources read it in a worker thread. A pipe
may not: ``cat | pipeline run - ...`` with an idle writer, or a FIFO nobody opened yet, block
a read for as long as the writer waits, and a worker thread blocked in ``read`` can neither be
cancelled (Ctrl-C would wait for the pipe) nor abandoned (Python waits for every non-daemon
thread at exit). :class:`StreamReader` moves the blocking ``open`` and ``read`` calls to a
daemon thread that hands blocks over a small bounded buffer: a reader waiting for a block is
released by :meth:`StreamReader.close`, so a source cancelled mid-read ends at once, and a
daemon thread still blocked in ``read`` does not keep the process alive.
"""

from __future__ import annotations

import collections
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

from stages.files._rows import BLOCK

__all__ = ["StreamReader", "is_stream"]

_BUFFERED_BLOCKS = 4
"""Blocks read ahead of the consumer at most (backpressure on the writer beyond that)."""


def is_stream(path: str) -> bool:
    """Whether ``path`` is ``-`` (stdin) or a file that is not a regular one (pipe, device)."""
    if path == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # opening it reports the problem
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _stdin() -> tuple[BinaryIO, bool]:
    """Standard input as an unbuffered file on its descriptor (closing it leaves fd 0 open).

    Not ``sys.stdin.buffer`` itself: a daemon thread blocked in a buffered read holds the
    buffer's lock, and Python aborts at exit when it cannot take that lock to close stdin.
    """
    buffer = sys.stdin.buffer
    try:
        fd = buffer.fileno()
    except (OSError, ValueError):  # not a real file (a test's stand-in): read it as it is
        return buffer, False
    return open(fd, "rb", buffering=0, closefd=False), True


class StreamReader:
    """A file-like reader (``read1``, ``read``, ``close``) fed by a daemon thread.

    Args:
        opener: Called in the daemon thread; returns ``(file, owned)``: a binary file to read
            blocks from and whether the thread closes it at the end (not stdin).
        name: What the thread is called (the path).
    """

    def __init__(self, opener: Callable[[], tuple[BinaryIO, bool]], name: str) -> None:
        self._opener = opener
        self._blocks: collections.deque[bytes | OSError] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._eof = False
        self._rest = b""
        self._thread = threading.Thread(target=self._pump, name=f"read {name}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str) -> StreamReader:
        """Return a reader of ``path`` (``-`` for stdin); the open happens in the thread."""
        if path == "-":
            return cls(_stdin, "<stdin>")
        return cls(lambda: (open(path, "rb", buffering=0), True), path)

    def _pump(self) -> None:
        try:
            f, owned = self._opener()
        except OSError as error:
            self._put(error)
            return
        read = getattr(f, "read1", f.read)
        try:
            while True:
                try:
                    block = read(BLOCK)
                except OSError as error:
                    self._put(error)
                    return
                if not self._put(block) or not block:
                    return
        finally:
            if owned:
                f.close()

    def _put(self, item: bytes | OSError) -> bool:
        """Hand a block over, waiting for room; ``False`` once the reader is closed."""
        with self._changed:
            while len(self._blocks) >= _BUFFERED_BLOCKS and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self._blocks.append(item)
            self._changed.notify_all()
            return True

    def read1(self, size: int = -1) -> bytes:
        """Return the next block (``b""`` at the end of the stream, or once closed).

        Raises:
            OSError: Reading the stream failed (the error of the thread's ``read``).
        """
        if self._rest and not self._closed:
            item: bytes | OSError = self._rest
            self._rest = b""
        else:
            with self._changed:
                while not self._blocks and not self._closed and not self._eof:
                    self._changed.wait()
                if self._closed or self._eof:
                    return b""
                item = self._blocks.popleft()
                self._changed.notify_all()
        if isinstance(item, OSError):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        elif 0 <= size < len(item):
            item, self._rest = item[:size], item[size:]
        return item

    read = read1

    def close(self) -> None:
        """Stop reading: a ``read1`` waiting now returns ``b""``.

        The thread ends at its next block, or stays blocked in ``read`` until the writer
        writes or closes: it is a daemon, so the process does not wait for it.
        """
        with self._changed:
            self._closed = True
            self._blocks.clear()
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed
