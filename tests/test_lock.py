"""The output folder's lock (lock.py): exclusive, leased, on local disks and URLs alike.

URL folders run through fsspec's memory:// store: the same calls as gs:// (gcsfs makes the
create atomic there), without a network."""

from __future__ import annotations

import json
import socket
import time
import uuid

import fsspec
import pytest

from gpt2_flax import lock as L
from gpt2_flax.config import Config
from gpt2_flax.errors import CheckpointError
from gpt2_flax.run_dir import RunDir


@pytest.fixture
def url():
    root = f"/bucket/{uuid.uuid4().hex}"
    yield f"memory://{root}/run"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _store(folder: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(folder)
    return {p: fs.cat_file(p) for p in fs.find(root)}


def test_a_url_folder_is_locked_refused_and_released_like_a_local_one(url):
    first = L.FolderLock(url)
    assert first.check() is None
    first.acquire()
    try:
        holder = L.read_lock(url)
        assert holder["pid"] > 0 and holder["token"] == first.token and holder["host"] == socket.gethostname()
        # The lock as a run on another host holds it (a relaunch elsewhere): a second run is refused
        # while the lease is fresh, the store unchanged. RunDir checks URL folders' locks too.
        fs, path = fsspec.core.url_to_fs(first.path)
        fs.pipe_file(path, json.dumps({**holder, "host": "tpu-vm-7", "token": "theirs"}).encode())
        before = _store(url)
        live = r"in use by another run \(pid \d+ on tpu-vm-7.*renewed \d+ s ago"
        with pytest.raises(CheckpointError, match=live):
            RunDir(url).check(Config(), "fp", {})
        with pytest.raises(CheckpointError, match=r"take_over_lock"):
            L.FolderLock(url).check()
        assert _store(url) == before
        note = L.FolderLock(url).check(take_over=True)
        assert "taking the folder over" in note and "take_over_lock" in note
    finally:
        first.release()
    assert L.read_lock(url)["token"] == "theirs"  # another run's lock is never deleted
    fs.rm_file(path)
    again = L.FolderLock(url)
    again.check()
    again.acquire()
    again.release()
    assert L.read_lock(url) is None


def test_a_lock_taken_between_the_check_and_the_create_wins(url, tmp_path):
    for folder in (url, tmp_path):
        late, early = L.FolderLock(folder), L.FolderLock(folder)
        assert late.check() is None and early.check() is None  # both saw a free folder
        early.acquire()
        with pytest.raises(CheckpointError, match="was just taken by another run"):
            late.acquire()
        assert L.read_lock(folder)["token"] == early.token
        early.release()


def test_a_lease_not_renewed_goes_stale_and_an_old_lock_never_does(tmp_path):
    record = {"pid": 999999999, "host": "tpu-vm-7", "started": "then"}
    (tmp_path / L.LOCK_FILE).write_text(json.dumps({**record, "renewed": time.time() - L.LEASE_S - 60}))
    note = L.FolderLock(tmp_path).check()
    assert "was last renewed 11 min ago by pid 999999999 on tpu-vm-7" in note
    (tmp_path / L.LOCK_FILE).write_text(json.dumps({**record, "renewed": time.time() - 30}))
    with pytest.raises(CheckpointError, match=r"renewed 3\d s ago and goes stale 10 min after"):
        L.FolderLock(tmp_path).check()
    (tmp_path / L.LOCK_FILE).write_text(json.dumps(record))  # written before leases: another host's
    with pytest.raises(CheckpointError, match="in use by another run"):
        L.FolderLock(tmp_path).check()


def test_renewal_keeps_the_lease_and_finds_a_take_over(tmp_path, url):
    for folder in (tmp_path, url):
        mine = L.FolderLock(folder)
        mine.check()
        mine.acquire()
        first = L.read_lock(folder)
        time.sleep(0.01)
        mine.renew()
        renewed = L.read_lock(folder)
        assert renewed["renewed"] > first["renewed"] and renewed["started"] == first["started"]
        mine.held()  # still ours
        # Another run takes the folder over (take_over_lock): the next renewal sees its token.
        theirs = L.FolderLock(folder)
        theirs.check(take_over=True)
        theirs.acquire()
        mine.renew()
        with pytest.raises(CheckpointError, match=r"taken over by another run \(pid \d+ on .*stops before"):
            mine.held()
        mine.release()
        assert L.read_lock(folder)["token"] == theirs.token  # the loser leaves the winner's lock
        theirs.release()
        assert L.read_lock(folder) is None
