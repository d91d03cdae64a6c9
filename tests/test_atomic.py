"""core.atomic: a file is replaced whole or left as it was, also when the writer fails or threads race."""

from __future__ import annotations

import threading

import pytest

from core.atomic import write_atomically
from core.models import sweep_partials


def test_writes_the_content_and_makes_the_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "state.json"
    write_atomically(path, lambda partial: partial.write_text("whole"))
    assert path.read_text() == "whole"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    seen = []

    def half_then_fail(partial):
        partial.write_text("half")
        seen.append(partial)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert ".partial" in seen[0].name  # what a killed process leaves is what sweep_partials removes


def test_threads_writing_one_file_leave_one_whole_content(tmp_path):
    path = tmp_path / "shared.bin"
    contents = [bytes([i]) * 200_000 for i in range(8)]
    barrier = threading.Barrier(len(contents))

    def writer(data):
        barrier.wait()
        for _ in range(5):
            write_atomically(path, lambda partial: partial.write_bytes(data))

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_a_partial_left_by_a_killed_writer_is_swept(tmp_path):
    path = tmp_path / "stats.safetensors"

    def killed(partial):
        partial.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, killed)
    left = tmp_path / "stats.safetensors.partial-1-2"  # as a process killed outright (no cleanup) leaves it
    left.write_bytes(b"half")
    assert sweep_partials(tmp_path, older_than=0.0) == 1 and not left.exists() and not path.exists()
