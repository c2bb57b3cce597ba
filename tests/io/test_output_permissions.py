"""Outputs get the permissions a plain open() would give (mkstemp's temporary files are owner-only)."""

import os
import stat

import pytest

from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.errors import AmctError
from amct_caffe.io.files import atomic_output


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_outputs_follow_the_umask(tmp_path, umask_027):
    with atomic_output(tmp_path / "a.txt") as f:
        f.write(b"x")
    staged = StagedOutputs()
    staged.add_text(tmp_path / "b.txt", "y")
    staged.commit()
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o640
    assert os.umask(0o027) == 0o027  # and the umask is left as it was


def test_replaced_outputs_keep_their_permissions(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("old")
        os.chmod(tmp_path / name, 0o604)
    with atomic_output(tmp_path / "a.txt") as f:
        f.write(b"new")
    staged = StagedOutputs()
    staged.add_text(tmp_path / "b.txt", "new")
    staged.commit()
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o604
    assert (tmp_path / "b.txt").read_text() == "new"


def test_merge_proto_command_output_follows_the_umask(tmp_path, umask_027):
    from caffe_patch.merge_proto.__main__ import _write_atomic

    _write_atomic(tmp_path / "merged.proto", "syntax = 'proto2';\n")
    assert mode(tmp_path / "merged.proto") == 0o640


def test_an_interrupt_while_outputs_are_moved_into_place_changes_nothing(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM between the renames: the files of an earlier run are put back, nothing is left."""
    import os as _os

    from amct_caffe.io.outputs import StagedOutputs

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    real_replace, calls = _os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # a moved to its backup, new a in place, b moved to its backup: then the signal
            raise KeyboardInterrupt
        return real_replace(src, dst)

    staged = StagedOutputs()
    staged.add_text(tmp_path / "a.txt", "new a")
    staged.add_text(tmp_path / "b.txt", "new b")
    monkeypatch.setattr(_os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        staged.commit()
    monkeypatch.setattr(_os, "replace", real_replace)
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_outputs_written_ahead_are_removed_when_the_call_fails_before_its_commit(tmp_path):
    """The files added so far are being written; the error before the commit removes them and the
    directories made for them."""
    from amct_caffe.io.outputs import StagedOutputs

    with pytest.raises(RuntimeError), StagedOutputs(ahead=True) as out:
        out.add_chunks(tmp_path / "new" / "sub" / "a.bin", [b"x" * 100_000, memoryview(b"yz")])
        out.add_text(tmp_path / "b.txt", "b")
        raise RuntimeError("the deploy model cannot be built")
    assert list(tmp_path.iterdir()) == []


def test_a_write_ahead_failure_is_reported_by_the_commit(tmp_path):
    from amct_caffe.io.outputs import StagedOutputs

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "file").write_text("not a directory")
    with StagedOutputs(ahead=True) as out:
        out.add_text(tmp_path / "a.txt", "new a")
        out.add_text(tmp_path / "file" / "b.txt", "b")
        with pytest.raises(AmctError, match="file is a file, not a directory.*no output file was changed"):
            out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "file"]
    assert (tmp_path / "a.txt").read_text() == "old a"


def test_outputs_written_ahead_are_committed(tmp_path, monkeypatch):
    """Chunks in order, through writes that stop short (as a write may) inside a buffer."""
    import os

    from amct_caffe.io.outputs import StagedOutputs

    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real_writev(fd, [bytes(buffers[0])[:7], *buffers[1:2]]))
    chunks = [b"head", memoryview(bytes(range(256)) * 40), b"", b"tail" * 9]
    with StagedOutputs(ahead=True) as out:
        out.add_chunks(tmp_path / "d" / "a.bin", chunks)
        out.add_json(tmp_path / "b.json", {"k": 1})
        out.commit()
    assert (tmp_path / "d" / "a.bin").read_bytes() == b"".join(bytes(c) for c in chunks)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.json", "d"]
