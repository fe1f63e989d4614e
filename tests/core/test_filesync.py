"""The file syncer: syncs on request on its own thread, reports through an
eventfd, and ends cleanly."""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

import pytest

from calejo_core.filesync import FileSyncer

WAIT = 5.0


def _outcome(syncer: FileSyncer) -> int | None:
    readable, _, _ = select.select([syncer.done_fd], [], [], WAIT)
    assert readable, f"no outcome within {WAIT} s"
    return syncer.outcome()


def test_syncs_a_file_on_request(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"x" * 4096)
    syncer = FileSyncer(path)
    try:
        assert syncer.path == os.fsencode(path)
        assert syncer.outcome() is None  # nothing asked yet
        for _ in range(3):
            with path.open("ab") as log:
                log.write(b"y" * 4096)
            syncer.request()
            assert _outcome(syncer) == 0
        assert syncer.outcome() is None  # each outcome is read once
    finally:
        assert syncer.stop()


def test_reports_the_errno_of_a_failure(tmp_path: Path) -> None:
    syncer = FileSyncer(tmp_path / "missing")
    try:
        syncer.request()
        assert _outcome(syncer) == errno.ENOENT
        (tmp_path / "missing").write_bytes(b"now it is here")
        syncer.request()
        assert _outcome(syncer) == 0
    finally:
        assert syncer.stop()


def test_stop_ends_the_thread_and_closes_the_eventfds(tmp_path: Path) -> None:
    syncer = FileSyncer(tmp_path / "log")
    fds = (syncer.request_fd, syncer.done_fd)
    assert syncer.alive()

    assert syncer.stop()
    assert not syncer.alive()
    assert syncer.exit_errno == 0
    assert (syncer.request_fd, syncer.done_fd) == (-1, -1)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert syncer.stop()  # a second stop does nothing


def test_a_path_with_nul_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without NUL"):
        FileSyncer(str(tmp_path / "a\0b"))


def test_a_thread_that_ends_by_itself_answers_with_its_errno(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"x")
    syncer = FileSyncer(path)
    wake = os.dup(syncer.request_fd)
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # The thread's next read finds a folder in the eventfd's place and
        # fails, as a broken eventfd would. Were it already waiting on the
        # eventfd, it first syncs for the request sent there.
        os.dup2(folder, syncer.request_fd)
        os.eventfd_write(wake, 1)
        outcomes = [_outcome(syncer)]
        if outcomes[0] == 0:
            outcomes.append(_outcome(syncer))
        assert outcomes[-1] == errno.EISDIR
        for _ in range(500):
            if not syncer.alive():
                break
            select.select([], [], [], 0.01)
        assert not syncer.alive()
        assert syncer.exit_errno == errno.EISDIR
    finally:
        os.close(wake)
        os.close(folder)
        assert syncer.stop()
