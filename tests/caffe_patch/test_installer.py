"""caffe_patch/install.py on a miniature Caffe tree: the [INFO] lines, idempotency, rollback, conflicts.

The proto merge is injected (its own tests are in test_merge_proto.py); the real one runs in
test_real_caffe_integration.py.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from caffe_patch import installer
from caffe_patch.installer import BLOCK_BEGIN, InstallError, install, patch_cmakelists, patch_makefile

INSTALL_PY = Path(installer.__file__).with_name("install.py")
PROTO = 'syntax = "proto2";\npackage caffe;\nmessage LayerParameter {\n  optional string name = 1;\n}\n'
MAKEFILE = ("PROJECT := caffe\nLIBRARIES += glog\n\n# Complete build flags.\n"
            "COMMON_FLAGS += $(foreach includedir,$(INCLUDE_DIRS),-isystem $(includedir))\n"
            "LDFLAGS += $(foreach library,$(LIBRARIES),-l$(library))\n")
CMAKELISTS = ("cmake_minimum_required(VERSION 3.18)\nproject(Caffe C CXX)\n"
              "# add_subdirectory(src/gtest)\nadd_subdirectory(src/caffe)\nadd_subdirectory(python)\n")

try:
    installer.find_quant_lib()
    HAVE_LIB = True
except InstallError:
    HAVE_LIB = False
pytestmark = pytest.mark.skipif(not HAVE_LIB, reason="libquant.so not installed (pip install .)")


def fake_merge(base, amct, custom):
    """Appends a marker once (idempotent), like merging definitions that are then present."""
    if "// merged" in base:
        return SimpleNamespace(text=base, added=[], notices=[])
    extra = "// merged\nmessage QuantParameter {\n  optional float scale = 2;\n}\n"
    return SimpleNamespace(text=base + extra, added=["quant_param = 208"], notices=["a notice"])


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "caffe-master"
    (root / "src/caffe/proto").mkdir(parents=True)
    (root / "src/caffe/proto/caffe.proto").write_text(PROTO)
    (root / "src/caffe/layers").mkdir()
    (root / "src/caffe/layers/conv_layer.cpp").write_text("// conv\n")
    (root / "include/caffe/layers").mkdir(parents=True)
    for name in ("lstm_layer.hpp", "rnn_layer.hpp"):  # Caffe 1.0's recurrent layers, which ours derive from
        (root / "include/caffe/layers" / name).write_text(f"// {name}\n")
    (root / "include/caffe/layer.hpp").write_text("template <typename Dtype>\nclass Layer {\n};\n")
    (root / "Makefile").write_text(MAKEFILE)
    (root / "Makefile.config").write_text("CPU_ONLY := 1\n")
    (root / "CMakeLists.txt").write_text(CMAKELISTS)
    return root


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(root, **kw):
    lines = []
    patch_dir = kw.pop("patch_dir", root / "no_patches")
    install(root, report=lines.append, merge=fake_merge, patch_dir=patch_dir, **kw)
    return lines


def test_first_install_prints_the_guides_lines_and_changes_the_tree(tree):
    lines = run(tree)
    where = str(tree.resolve())
    assert lines == [
        f"[INFO]Begin to copy source files, header files and quant_lib to '{where}'",
        f"[INFO]Finish copy source files, header files and quant_lib to '{where}'",
        "[INFO]Begin to install patch.",
        "[INFO]Finish install patch.",
        "[WARNING]a notice",
        "[INFO]Added to caffe.proto: quant_param = 208",
        '[INFO]Merge and replace "caffe.proto" success.',
        '[INFO]Merge and replace "Makefile" success.',
        '[INFO]Merge and replace "CMakeLists.txt" success.',
    ]
    for rel in ("src/caffe/layers/quant_layer.cpp", "src/caffe/layers/ifmr_layer.cpp",
                "include/caffe/layers/dequant_layer.hpp", "include/amct/capi.h", "quant_lib/libquant.so"):
        assert (tree / rel).is_file(), rel
    assert (tree / "quant_lib/libquant.so").stat().st_mode & 0o111
    assert "// merged" in (tree / "src/caffe/proto/caffe.proto").read_text()
    backups = list((tree / "src/caffe/proto").glob("caffe.proto.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == PROTO
    assert (tree / "Makefile").read_text().count(BLOCK_BEGIN) == 1
    cmake = (tree / "CMakeLists.txt").read_text()
    assert cmake.index(BLOCK_BEGIN) < cmake.index("add_subdirectory(src/caffe)")
    assert cmake.index("# add_subdirectory(src/gtest)") < cmake.index(BLOCK_BEGIN)


def test_second_install_changes_nothing(tree):
    run(tree)
    before = snapshot(tree)
    lines = run(tree)
    assert snapshot(tree) == before
    assert '[INFO]"caffe.proto" already holds the merged definitions; not replaced.' in lines
    assert '[INFO]"Makefile" is already patched; not modified.' in lines


def test_a_failure_restores_every_file(tree, monkeypatch):
    before = snapshot(tree)
    real_write = installer.Transaction.write

    def failing_write(self, change):
        if change.path.name == "CMakeLists.txt":
            raise OSError("disk full")
        real_write(self, change)

    monkeypatch.setattr(installer.Transaction, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run(tree)
    assert snapshot(tree).keys() == before.keys()
    assert all(snapshot(tree)[k][0] == before[k][0] for k in before)
    assert not (tree / "quant_lib").exists() and not (tree / "include/caffe/layers/quant_layer.hpp").exists()


def test_a_file_that_cannot_be_written_is_not_restored_first_and_symlinks_come_back_as_links(tree, monkeypatch):
    """The write that fails changed nothing (atomic): rollback must not stop at it, and a symbolic link the
    install replaced is restored as that link, not as a copy of its target."""
    target = tree.parent / "shared_makefile"
    target.write_text((tree / "Makefile").read_text())
    (tree / "Makefile").unlink()
    (tree / "Makefile").symlink_to(target)
    before, target_before = snapshot(tree), target.read_bytes()
    real = installer._atomic_write

    def refusing(path, data, mode):
        if path.name == "CMakeLists.txt":  # e.g. an immutable file: every write of it fails
            raise PermissionError(1, "Operation not permitted")
        real(path, data, mode)

    monkeypatch.setattr(installer, "_atomic_write", refusing)
    with pytest.raises(PermissionError):
        run(tree)
    assert (tree / "Makefile").is_symlink() and os.readlink(tree / "Makefile") == str(target)
    assert target.read_bytes() == target_before
    assert snapshot(tree).keys() == before.keys() and all(snapshot(tree)[k][0] == before[k][0] for k in before)


def test_changes_that_cannot_be_undone_are_named(tree, monkeypatch):
    real = installer._atomic_write
    calls = {"n": 0}

    def failing(path, data, mode):
        if path.name == "CMakeLists.txt":
            raise OSError(28, "No space left on device")
        if path.name == "Makefile" and (tree / "Makefile").read_text().count(BLOCK_BEGIN):
            calls["n"] += 1  # restoring the patched Makefile fails too
            raise OSError(30, "Read-only file system")
        real(path, data, mode)

    monkeypatch.setattr(installer, "_atomic_write", failing)
    with pytest.raises(installer.PartialRollback, match=r"(?s)No space left.*could not be undone.*Makefile: "
                                                        r"Read-only file system"):
        run(tree)
    assert calls["n"] == 1


def test_a_foreign_layer_file_of_the_same_name_is_not_overwritten(tree):
    (tree / "src/caffe/layers/quant_layer.cpp").write_text("// someone else's Quant layer\n")
    before = snapshot(tree)
    with pytest.raises(InstallError, match="is not an amct_caffe file"):
        run(tree)
    assert snapshot(tree) == before


def test_merge_errors_leave_the_tree_unchanged(tree):
    before = snapshot(tree)

    def clash(base, amct, custom):
        raise ValueError("field number 208 clashes")

    with pytest.raises(ValueError, match="208"):
        install(tree, merge=clash, patch_dir=tree / "none")
    assert snapshot(tree) == before


def test_patches_apply_once(tree, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "conv_layer.cpp.patch").write_text(
        "--- a/src/caffe/layers/conv_layer.cpp\n+++ b/src/caffe/layers/conv_layer.cpp\n"
        "@@ -1 +1,2 @@\n // conv\n+// patched\n")
    lines = run(tree, patch_dir=patches)
    assert "[INFO]Install patch 'conv_layer.cpp.patch' successfully." in lines
    assert (tree / "src/caffe/layers/conv_layer.cpp").read_text() == "// conv\n// patched\n"
    lines = run(tree, patch_dir=patches)
    assert "[INFO]Patch 'conv_layer.cpp.patch' is already installed." in lines
    assert (tree / "src/caffe/layers/conv_layer.cpp").read_text() == "// conv\n// patched\n"


def test_a_patch_that_does_not_apply_fails_before_any_change(tree, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "bad.patch").write_text(
        "--- a/src/caffe/layers/conv_layer.cpp\n+++ b/src/caffe/layers/conv_layer.cpp\n"
        "@@ -1 +1,2 @@\n // not what the file holds\n+// patched\n")
    before = snapshot(tree)
    with pytest.raises(InstallError, match="Install patch 'bad.patch' failed"):
        run(tree, patch_dir=patches)
    assert snapshot(tree) == before


SHIPPED = installer.PATCH_ROOT / "patch"
# The guide's patch files and what each creates (user guide, sample目录及patch目录说明).
GUIDE_PATCHES = {
    "lstm_calibration_layer.cpp.patch": "src/caffe/layers/lstm_calibration_layer.cpp",
    "lstm_calibration_layer.hpp.patch": "include/caffe/layers/lstm_calibration_layer.hpp",
    "lstm_quant_layer.cpp.patch": "src/caffe/layers/lstm_quant_layer.cpp",
    "lstm_quant_layer.hpp.patch": "include/caffe/layers/lstm_quant_layer.hpp",
}


def test_the_shipped_patches_are_the_guides_and_print_its_lines(tree):
    assert sorted(p.name for p in SHIPPED.glob("*.patch")) == sorted(GUIDE_PATCHES)
    lines = run(tree, patch_dir=SHIPPED)
    begin = lines.index("[INFO]Begin to install patch.")
    assert lines[begin:begin + 6] == ["[INFO]Begin to install patch.",
                                      *(f"[INFO]Install patch '{n}' successfully." for n in sorted(GUIDE_PATCHES)),
                                      "[INFO]Finish install patch."]
    for rel in GUIDE_PATCHES.values():
        text = (tree / rel).read_text()
        assert installer.SOURCE_MARKER in text.split("\n", 1)[0], rel
    layers = (tree / "src/caffe/layers/lstm_calibration_layer.cpp").read_text()
    assert "REGISTER_LAYER_CLASS(LSTMCalibration);" in layers and "REGISTER_LAYER_CLASS(RNNCalibration);" in layers
    layers = (tree / "src/caffe/layers/lstm_quant_layer.cpp").read_text()
    assert "REGISTER_LAYER_CLASS(LSTMQuant);" in layers and "REGISTER_LAYER_CLASS(RNNQuant);" in layers


def test_the_shipped_patches_install_once(tree):
    run(tree, patch_dir=SHIPPED)
    before = snapshot(tree)
    lines = run(tree, patch_dir=SHIPPED)
    assert snapshot(tree) == before
    for name in GUIDE_PATCHES:
        assert f"[INFO]Patch '{name}' is already installed." in lines


def test_a_layer_file_of_an_earlier_install_is_replaced_by_the_patch(tree):
    run(tree, patch_dir=SHIPPED)
    new = snapshot(tree)
    old = tree / GUIDE_PATCHES["lstm_quant_layer.hpp.patch"]
    old.write_text(f"// {installer.SOURCE_MARKER}: an older LSTMQuant\n#error old\n")
    lines = run(tree, patch_dir=SHIPPED)
    assert "[INFO]Install patch 'lstm_quant_layer.hpp.patch' successfully." in lines
    assert "[INFO]Patch 'lstm_quant_layer.cpp.patch' is already installed." in lines
    assert {k: v[0] for k, v in snapshot(tree).items()} == {k: v[0] for k, v in new.items()}


def test_a_new_file_patch_with_diffs_timestamps_also_replaces_an_earlier_install(tree, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    marker = f"// {installer.SOURCE_MARKER}: a layer"
    (patches / "x_layer.cpp.patch").write_text(
        "--- /dev/null\t1970-01-01 00:00:00.000000000 +0000\n"
        "+++ b/src/caffe/layers/x_layer.cpp\t2026-12-06 06:00:00.000000000 +0000\n"
        f"@@ -0,0 +1,2 @@\n+{marker}\n+// new\n")
    (tree / "src/caffe/layers/x_layer.cpp").write_text(f"{marker}\n// old\n")
    lines = run(tree, patch_dir=patches)
    assert "[INFO]Install patch 'x_layer.cpp.patch' successfully." in lines
    assert (tree / "src/caffe/layers/x_layer.cpp").read_text() == f"{marker}\n// new\n"


def test_a_foreign_file_where_a_patch_creates_one_stops_the_install(tree):
    foreign = tree / GUIDE_PATCHES["lstm_calibration_layer.cpp.patch"]
    foreign.write_text("// someone else's LSTM calibration layer\n")
    before = snapshot(tree)
    with pytest.raises(InstallError, match="lstm_calibration_layer.cpp.patch' failed: .* is not an amct_caffe file"):
        run(tree, patch_dir=SHIPPED)
    assert snapshot(tree) == before


def test_a_failure_while_patching_removes_the_patched_files(tree, monkeypatch):
    before = snapshot(tree)
    real_write = installer.Transaction.write

    def failing_write(self, change):
        if change.path.name == "lstm_quant_layer.cpp":
            raise OSError("disk full")
        real_write(self, change)

    monkeypatch.setattr(installer.Transaction, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run(tree, patch_dir=SHIPPED)
    assert {k: v[0] for k, v in snapshot(tree).items()} == {k: v[0] for k, v in before.items()}
    assert sorted(p.name for p in (tree / "include/caffe/layers").iterdir()) == ["lstm_layer.hpp", "rnn_layer.hpp"]


def test_build_blocks_are_replaced_in_place_not_duplicated():
    once = patch_makefile(MAKEFILE)
    assert patch_makefile(once) == once
    stale = once.replace("LIBRARIES += quant", "LIBRARIES += quant_old")
    assert patch_makefile(stale) == once
    c_once = patch_cmakelists(CMAKELISTS)
    assert patch_cmakelists(c_once) == c_once
    with pytest.raises(InstallError, match="cannot find where"):
        patch_cmakelists("project(x)\n")


def test_not_a_caffe_tree(tmp_path):
    with pytest.raises(InstallError, match="not a Caffe source tree"):
        install(tmp_path, merge=fake_merge)


def test_install_py_help():
    res = subprocess.run([sys.executable, str(INSTALL_PY), "-h"], capture_output=True, text=True, check=False)
    assert res.returncode == 0
    assert "--caffe_dir" in res.stdout and "--custom_proto" in res.stdout


def test_install_py_reports_a_merge_clash_and_changes_nothing(tree, tmp_path):
    """The real merge: a custom.proto reusing an AMCT field number stops install.py before any change."""
    custom = tmp_path / "custom.proto"
    custom.write_text("message LayerParameter {\n  optional MyParameter my_param = 200001;\n}\n"
                      "message MyParameter {\n  optional float x = 1;\n}\n")
    before = snapshot(tree)
    res = subprocess.run([sys.executable, str(INSTALL_PY), "--caffe_dir", str(tree), "--custom_proto", str(custom)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert "[ERROR]" in res.stderr and "200001" in res.stderr and "ifmr_param" in res.stderr
    assert "[INFO]" not in res.stdout
    assert snapshot(tree) == before


@pytest.mark.parametrize("case", ["binary caffe.proto", "custom_proto is a directory", "binary custom_proto",
                                  "NUL byte in a path"])
def test_bad_input_files_are_one_error_line_and_change_nothing(tree, tmp_path, case):
    """OS and encoding errors used to escape as UnicodeDecodeError / IsADirectoryError tracebacks."""
    custom = tmp_path / "custom.proto"
    custom.write_text('syntax = "proto2";\n')
    expected = {"binary caffe.proto": "is not UTF-8 text", "custom_proto is a directory": "is a directory",
                "binary custom_proto": "is not UTF-8 text", "NUL byte in a path": "contains a NUL byte"}[case]
    if case == "binary caffe.proto":
        (tree / "src/caffe/proto/caffe.proto").write_bytes(b"\xff\xfe\x00caffe")
    elif case == "custom_proto is a directory":
        custom = tmp_path
    elif case == "binary custom_proto":
        custom.write_bytes(b"\x89PNG\xff")
    else:
        custom = tmp_path / "cu\0stom.proto"
    before = snapshot(tree)
    res = subprocess.run([sys.executable, str(INSTALL_PY), "--caffe_dir", str(tree), "--custom_proto", str(custom)]
                         if "\0" not in str(custom) else
                         [sys.executable, "-c", "import runpy, sys; sys.argv = ['install.py', '--caffe_dir', "
                          "sys.argv[1], '--custom_proto', sys.argv[2].replace('@', chr(0))]; "
                          f"runpy.run_path({str(INSTALL_PY)!r}, run_name='__main__')", str(tree),
                          str(custom).replace("\0", "@")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert expected in res.stderr and "[ERROR]Install failed; the Caffe tree is unchanged." in res.stderr
    assert snapshot(tree) == before


def test_a_tree_without_recurrent_layers_gets_the_other_layers_and_a_warning(tree):
    """An older tree (py-faster-rcnn's Caffe, BVLC 1.0-rc3) has no LSTMLayer / RNNLayer: the recurrent layers'
    patches would make sources that break the whole libcaffe build, yet the install said it succeeded."""
    for name in ("lstm_layer.hpp", "rnn_layer.hpp"):
        (tree / "include/caffe/layers" / name).unlink()
    lines = run(tree, patch_dir=SHIPPED)
    assert not (tree / "src/caffe/layers/lstm_quant_layer.cpp").exists()
    assert (tree / "src/caffe/layers/quant_layer.cpp").exists()
    (warning,) = [line for line in lines if line.startswith("[WARNING]") and "LSTM" in line]
    assert "has no LSTM / RNN layers" in warning and "lstm_quant_layer.cpp.patch" in warning


def test_a_tree_whose_layer_takes_two_types_is_refused(tree):
    """NVIDIA Caffe's Layer<Ftype, Btype>: our layers derive from Layer<Dtype> and would not compile."""
    (tree / "include/caffe/layer.hpp").write_text("template<typename Ftype, typename Btype>\nclass Layer {\n};\n")
    before = snapshot(tree)
    with pytest.raises(InstallError, match="not Caffe's Layer<Dtype>"):
        run(tree, patch_dir=SHIPPED)
    assert snapshot(tree) == before
