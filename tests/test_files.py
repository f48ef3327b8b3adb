"""fasttrain._files: what fasttrain saves is whole or absent."""

import threading

import pytest

from fasttrain._files import TEMPORARY, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def write_half(f):
        f.write(b"new, half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, write_half)
    assert path.read_text() == "old"
    assert list(tmp_path.glob(TEMPORARY)) == []


def test_threads_writing_one_file_leave_one_whole_version(tmp_path):
    # each thread's temporary is its own (the thread id in its name), so no write truncates another's
    path = tmp_path / "choices.json"
    texts = [str(i) * 100_000 for i in range(8)]
    start = threading.Barrier(len(texts))

    def write(text):
        start.wait()
        for _ in range(5):
            atomic_write_text(path, text)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert path.read_text() in texts
    assert list(tmp_path.glob(TEMPORARY)) == []


def test_a_write_error_names_the_target(tmp_path, monkeypatch):
    def no_space(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(tmp_path / "shard.bin", no_space)
    assert info.value.filename == str(tmp_path / "shard.bin")
