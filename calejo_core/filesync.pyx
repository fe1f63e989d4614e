# cython: language_level=3
"""Syncing a file to disk on a thread that never holds the GIL.

The adapter answers a durable write only once the database's log is on
disk. An ``fdatasync`` done on the event loop stalls it for the length of
the sync; one done on an ordinary Python thread costs the loop less time
but the thread must take the GIL back before it can say it is done, and a
busy event loop keeps it waiting. :class:`FileSyncer` runs its thread
entirely in C: the loop asks for a sync by writing to one eventfd, and the
thread opens the file by name, syncs it, closes it and writes the outcome
to another eventfd, which the loop watches with ``add_reader``. Neither
side waits for the GIL on the other's behalf.

This is the one part of the core that touches a file; it knows nothing of
what the file holds.
"""

import os
import threading

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint64_t
from posix.unistd cimport close, read, write


cdef extern from "fcntl.h" nogil:
    int c_open "open"(const char *path, int flags)
    int O_RDONLY
    int O_CLOEXEC


cdef extern from "unistd.h" nogil:
    int fdatasync(int fd)


cdef uint64_t STOP = 1 << 40
"""Written to the request eventfd, ends the thread (a request adds 1)."""


cdef uint64_t _sync_until_stopped(int requests, int done, const char *path) noexcept nogil:
    """The thread's loop: wait for a request, sync, report; until STOP."""
    cdef uint64_t asked = 0
    cdef uint64_t outcome
    cdef long got
    cdef int fd
    cdef int failure
    while True:
        got = read(requests, &asked, 8)
        if got != 8:
            if errno == EINTR:
                continue
            return <uint64_t>errno
        if asked >= STOP:
            return 0
        failure = 0
        fd = c_open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0:
            failure = errno
        else:
            if fdatasync(fd) != 0:
                failure = errno
            close(fd)
        # One sync is outstanding at a time, so the eventfd's counter holds
        # one outcome: 1 for done, 1 + 2 * errno for a failure.
        outcome = 1 + 2 * <uint64_t>failure
        while write(done, &outcome, 8) != 8:
            if errno != EINTR:
                return <uint64_t>errno


cdef class FileSyncer:
    """Syncs the file at ``path`` on request, one sync at a time.

    ``request()`` starts a sync; when it is done, the eventfd ``done_fd``
    turns readable and ``outcome()`` gives 0 or the errno of the failure.
    ``stop()`` ends the thread and closes both eventfds. Should the thread
    end by itself (an eventfd failed), ``alive()`` turns false,
    ``exit_errno`` says why, and ``done_fd`` turns readable with that
    errno as the outcome, for a sync that may be waiting.
    """

    cdef readonly bytes path
    cdef readonly int request_fd
    cdef readonly int done_fd
    cdef object _thread
    cdef readonly object exit_errno

    def __cinit__(self, path):
        self.request_fd = -1
        self.done_fd = -1

    def __init__(self, path):
        self.path = os.fsencode(path)
        if b"\0" in self.path:
            raise ValueError(f"a file path without NUL, got {path!r}")
        self.request_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.exit_errno = None
        self._thread = threading.Thread(
            target=self._run, name="calejo-filesync", daemon=True
        )
        self._thread.start()

    def _run(self):
        cdef int requests = self.request_fd
        cdef int done = self.done_fd
        cdef const char *path = self.path
        cdef uint64_t result
        with nogil:
            result = _sync_until_stopped(requests, done, path)
        self.exit_errno = int(result)
        if result:
            # Ended by a failure, not by stop(): a sync asked for may still
            # wait for its outcome, so it gets this failure as its outcome.
            try:
                os.eventfd_write(done, 1 + 2 * result)
            except OSError:
                pass

    def request(self):
        """Start a sync of the file (the last one must have been read)."""
        os.eventfd_write(self.request_fd, 1)

    def outcome(self):
        """0 once the sync is done, or the errno it failed with; None while
        it is still running."""
        try:
            value = os.eventfd_read(self.done_fd)
        except BlockingIOError:
            return None
        return (value - 1) // 2

    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout=5.0):
        """End the thread and close the eventfds; True if it ended in time."""
        ended = True
        if self._thread is not None and self._thread.is_alive():
            os.eventfd_write(self.request_fd, STOP)
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
        if ended:
            for fd in (self.request_fd, self.done_fd):
                if fd >= 0:
                    os.close(fd)
            self.request_fd = self.done_fd = -1
        return ended
