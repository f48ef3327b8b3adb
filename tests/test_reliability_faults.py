"""Reliability against faults: kill -9 at any point of a save, and a real full disk and read-only mount (in a
private mount namespace), each leaving every saved file as it was and every failure one line."""

import contextlib
import ctypes
import io
import json
import os
import random
import shutil
import signal

import pytest
import torch
from reliability_helpers import (
    make_corpus,
    make_done_run,
    one_error_line,
    snapshot,
)

from fasttrain.cli import main
from fasttrain.train import checkpoint

pytestmark = pytest.mark.usefixtures("cpu_user")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, corpus_dir):
    return make_done_run(tmp_path_factory, corpus_dir)


# -- 7. kill -9 anywhere in a save


def kill_during_save(run, seed, state):
    """In a forked child (no interpreter start, no imports): checkpoint.save(run, 3, state) killed by SIGKILL at a
    point drawn by seed among the operations that touch the disk (each chunk torch.save writes, each fsync, rename
    and unlink), counted on a dry run first. Returns the child's wait status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:
        calls = {"n": 0, "kill_at": None}

        def counted(fn):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)

            return wrapper

        checkpoint._Hashing.write = counted(checkpoint._Hashing.write)
        for name in ("fsync", "replace", "unlink"):
            setattr(os, name, counted(getattr(os, name)))
        checkpoint.save(run / "dry", 1, state, keep_last=1)
        checkpoint.save(run / "dry", 2, state, keep_last=1, is_best=True)  # the second prunes the first
        calls["kill_at"] = calls["n"] + random.Random(seed).randint(1, calls["n"] // 2)
        checkpoint.save(run, 3, state, keep_last=2, is_best=True)
    finally:
        os._exit(1)  # not killed: the parent sees exit status 1


def model_state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {f"w{i}": torch.randn(64, 64, generator=g) for i in range(6)}}


@pytest.mark.parametrize("seed", [0, 1, 2, *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 23))])
def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_run(tmp_path, seed):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model_state(step), keep_last=2, is_best=step == 1)
    before = snapshot(tmp_path / "checkpoints")
    status = kill_during_save(tmp_path, seed, model_state(3))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    after = snapshot(tmp_path / "checkpoints")
    # latest and best load and verify: the old ones, or step 3's once it is whole.
    latest, best = checkpoint.load(tmp_path), checkpoint.load(tmp_path, "best")
    assert latest["step"] in (2, 3) and best["step"] in (1, 3)
    for name in ("latest", "best"):
        checkpoint.verify(checkpoint.resolve(tmp_path, name))
    # Every file saved before is as it was, but for the pointers moved to step 3 and what the prune then removed.
    for path, data in before.items():
        if path.name in ("latest", "best") and after[path] != data:
            assert after[path] == b"step_00000003.pt"
        elif path not in after:
            assert latest["step"] == 3 and path.name.startswith("step_00000001.pt")
        else:
            assert after[path] == data, path
    # The next save sweeps what the killed one left: its temporaries, a sidecar whose file a killed prune removed.
    checkpoint.save(tmp_path, 4, {"step": 4}, keep_last=2)
    folder = tmp_path / "checkpoints"
    assert not list(folder.glob(".*.tmp-*"))
    assert all(p.with_name(p.name.removesuffix(".sha256")).is_file() for p in folder.glob("*.sha256"))


# -- 7. a real full disk and a real read-only mount, in a private mount namespace of a forked child

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _private_mounts(libc) -> None:
    """This process in a mount namespace of its own (and a user namespace when not root), whose mounts no other
    process sees and which end with it; OSError where the machine does not allow it."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    args = [None if a is None else str(a).encode() for a in (source, target, fstype)]
    if libc.mount(*args, flags, None if data is None else data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def in_mount_namespace(tmp_path, body):
    """body() in a forked child with private mounts; returns what it returned (JSON), or None where mounts are not
    allowed here."""
    result = tmp_path / "result.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                _private_mounts(libc)
            except OSError:
                result.write_text("null")
                code = 0
            else:
                result.write_text(json.dumps(body(libc)))
                code = 0
        except BaseException as e:
            result.write_text(json.dumps({"error": repr(e)}))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return json.loads(result.read_text())


def test_a_real_full_disk_and_a_real_read_only_mount_are_one_line(tmp_path, done_run, corpus_dir):
    def body(libc):
        out = {}
        disk = tmp_path / "disk"
        disk.mkdir()
        used = sum(p.stat().st_size for p in done_run.rglob("*") if p.is_file())
        _mount(libc, "tmpfs", disk, "tmpfs", 0, f"size={used + 200_000}")  # no room for one more checkpoint
        shutil.copytree(done_run, disk / "run")
        before = snapshot(disk / "run")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            out["full_code"] = main(["train", "--resume", str(disk / "run"), "--train.steps", "6"])
        out["full_err"] = err.getvalue()
        after = snapshot(disk / "run")
        out["full_kept"] = all(after.get(p) == b for p, b in before.items() if "checkpoints" in p.parts)
        out["full_temporaries"] = [str(p) for p in (disk / "run").rglob(".*.tmp-*")]

        ro = tmp_path / "ro"
        shutil.copytree(done_run, ro)
        _mount(libc, ro, ro, None, MS_BIND)
        _mount(libc, None, ro, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        before = snapshot(ro)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            out["ro_code"] = main(["train", "--resume", str(ro), "--train.steps", "6"])
            out["ro_eval"] = main(["eval", "--checkpoint", str(ro), "--data", str(corpus_dir), "--max-batches", "1"])
        out["ro_err"] = err.getvalue()
        out["ro_kept"] = snapshot(ro) == before
        return out

    out = in_mount_namespace(tmp_path, body)
    if out is None:
        pytest.skip("no private mount namespace here: the patched full disk and read-only tests above stand in")
    assert "error" not in out, out
    assert out["full_code"] == 1 and out["full_kept"] and not out["full_temporaries"], out
    line = one_error_line(out["full_err"])
    assert "No space left on device: " in line and "step_00000006.pt; the disk is full" in line
    assert out["ro_code"] == 1 and out["ro_eval"] == 0 and out["ro_kept"], out
    line = one_error_line(out["ro_err"])
    assert f"Read-only file system: {tmp_path / 'ro' / '.lock'}; it is on a read-only file system" in line
