"""gce.io: lock files (one holder, named; a killed holder's lock taken over) and folders a command owns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gce.io.locks import LockedError, hold_lock, try_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from gce.io.locks import hold_lock
    with hold_lock(sys.argv[1], "the test folder"):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _start_holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path):
    lock = tmp_path / "folder" / "write.lock"
    holder = _start_holder(lock)
    try:
        refused = pytest.raises(LockedError, match=rf"the test folder is in use by process {holder.pid} ")
        with refused, hold_lock(lock, "the test folder"):
            pytest.fail("entered a lock another process holds")
        with try_lock(lock) as other:
            assert other == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # SIGKILL left the file with the dead pid in it; the kernel dropped its flock.
    assert lock.read_text() == str(holder.pid)
    with hold_lock(lock, "the test folder"):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_a_pid_file_without_flock_is_respected_while_its_process_lives(tmp_path):
    lock = tmp_path / "running.lock"
    lock.write_text(str(os.getppid()))  # alive, holds no flock (as an older gce wrote it)
    with try_lock(lock) as holder:
        assert holder == os.getppid()
    assert lock.read_text() == str(os.getppid())  # not removed by the refusal


def test_two_processes_racing_for_a_stale_lock_never_both_hold_it(tmp_path):
    lock = tmp_path / "index.lock"
    lock.write_text("999999999")  # no such pid: stale
    racer = textwrap.dedent(
        """
        import sys, time
        from gce.io.locks import try_lock
        held = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with try_lock(sys.argv[1]) as holder:
                if holder is None:
                    with open(sys.argv[2], "a") as log:
                        log.write("in\\n"); log.flush(); time.sleep(0.002); log.write("out\\n")
                    held += 1
        print(held)
        """
    )
    journal = tmp_path / "journal"
    procs = [
        subprocess.Popen([sys.executable, "-c", racer, str(lock), str(journal)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    lines = journal.read_text().split()
    assert sum(counts) > 0 and len(lines) == 2 * sum(counts)
    # Mutual exclusion: every "in" is followed by its own "out" before anyone else's "in".
    assert lines == ["in", "out"] * sum(counts)


def test_lock_message_when_the_holder_is_unknown(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("")
    with hold_lock(lock, "x"):  # an empty, unlocked file is free
        pass


def test_a_foreign_non_empty_folder_is_refused_naming_what_is_in_it(tmp_path):
    from gce.io import OutputError, check_output_dir

    folder = tmp_path / "site"
    folder.mkdir()
    for name in ["index.html", "items.csv", "a", "b", "c", "d"]:
        (folder / name).write_text("user's")
    with pytest.raises(OutputError, match=r"no manifest.json\): it holds a, b, c, d, index.html and 1 more"):
        check_output_dir(folder, what="--out", marker="manifest.json")
    assert check_output_dir(tmp_path / "new", marker="manifest.json") == tmp_path / "new"  # missing: fine
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", marker="manifest.json") == tmp_path / "empty"
    (folder / "manifest.json").write_text("{}")  # one of the command's own folders
    assert check_output_dir(folder, marker="manifest.json") == folder
    assert all((folder / n).read_text() == "user's" for n in ["index.html", "items.csv"])
