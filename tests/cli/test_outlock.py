"""cli/outlock.py: one run per output folder; stale locks taken over; the lock gone after every kind of end."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from fused_stream.cli.main import main
from fused_stream.cli.outlock import LOCK_NAME, OutputLockedError, output_lock


def _write_lock(out, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))
    return lock


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_lock_and_its_owner(tmp_path):
    with output_lock(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputLockedError) as refused, output_lock(tmp_path / "out"):
            pass
        message = str(refused.value)
        assert str(lock) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert lock.exists()  # the refused run leaves the holder's lock alone
    assert not lock.exists()


def test_the_lock_goes_on_errors_and_the_folder_it_made_if_empty(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="boom"), output_lock(out):
        raise ValueError("boom")
    assert not (tmp_path / "new").exists()
    with output_lock(out):
        (out / "results.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    lock = _write_lock(tmp_path, _dead_pid())
    with caplog.at_level(logging.WARNING), output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not lock.exists()


@pytest.mark.parametrize("holder", ["live", "other host", "unreadable"])
def test_locks_that_may_be_live_are_never_taken_over(tmp_path, holder):
    if holder == "unreadable":
        lock = tmp_path / LOCK_NAME
        lock.write_text("")
    else:
        lock = _write_lock(tmp_path, os.getppid() if holder == "live" else _dead_pid(),
                           host=None if holder == "live" else "elsewhere.example")
    before = lock.read_text()
    with pytest.raises(OutputLockedError, match="in use by another run"), output_lock(tmp_path):
        pass
    assert lock.read_text() == before


def test_ranks_other_than_0_do_not_lock(tmp_path):
    with output_lock(tmp_path / "out", enabled=False) as lock:
        assert lock is None and not (tmp_path / "out").exists()


def test_the_cli_refuses_an_out_in_use_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    lock = _write_lock(out, os.getppid())
    assert main(["--generate", "1", "--frames", "8", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(lock) in err and f"pid {os.getppid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_the_cli_releases_the_lock_after_success_and_after_bad_data(tmp_path):
    out = tmp_path / "out"
    assert main(["--generate", "1", "--frames", "8", "--out", str(out), "-q"]) == 0
    assert not (out / LOCK_NAME).exists() and (out / "results.json").exists()
    bad = tmp_path / "bad.pt"
    import torch

    torch.save(torch.zeros(3, 20, dtype=torch.long), bad)  # 3 streams: fails while loading, after the lock
    assert main(["--codes", str(bad), "--out", str(tmp_path / "out2"), "-q"]) == 2
    assert not (tmp_path / "out2").exists()
