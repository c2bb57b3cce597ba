"""Outputs get the permissions a plain open() would give (mkstemp's temporary files are owner-only)."""

import os
import stat

import pytest

from amct_caffe.io.outputs import StagedOutputs
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
