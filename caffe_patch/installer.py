"""What ``caffe_patch/install.py`` does to a Caffe source tree (user guide, 安装后处理 / patch安装).

``install(caffe_dir, custom_proto)`` first *plans* every change without touching the tree:

1. copy our layer sources (``caffe_patch/src``, ``caffe_patch/include``, mirrored into the tree),
   libquant's C header (``include/amct/capi.h``) and ``libquant.so`` (``quant_lib/``);
2. apply ``caffe_patch/patch/*.patch`` (unified diffs against the tree, ``-p1``); a patch that is
   already applied is skipped;
3. merge the tree's ``src/caffe/proto/caffe.proto`` with ``amct_custom.proto`` and the user's
   ``custom.proto`` (``caffe_patch.merge_proto``), backing the old file up as
   ``caffe.proto.<timestamp>.bak``;
4. add a marked block to ``Makefile`` and ``CMakeLists.txt``: link libquant (with an rpath) and
   raise the C++ standard to C++11 only when the compiler's default is older.

Then it applies the plan; if anything fails, every file written is restored (or removed). A second
run plans nothing, because identical files are not rewritten and the marked blocks are replaced
by themselves. Merge conflicts (``MergeError``) are raised before the tree is touched.

libquant: ``caffe_patch/quant_lib/libquant.so`` (+ ``capi.h``) when packaged there, else the
``libquant.so`` that ``pip install .`` put into the installed ``amct_caffe/lib`` (the library the
Python executor's kernels are built from) with ``csrc/include/amct/capi.h`` of this repository.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PATCH_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PATCH_ROOT.parent
SOURCE_MARKER = "amct_caffe caffe_patch"  # first line of every layer file we install
BLOCK_BEGIN = "# >>> amct_caffe caffe_patch (install.py) >>>"
BLOCK_END = "# <<< amct_caffe caffe_patch (install.py) <<<"
PROTO_REL = Path("src/caffe/proto/caffe.proto")
QUANT_LIB_REL = Path("quant_lib/libquant.so")
CAPI_REL = Path("include/amct/capi.h")

MAKEFILE_BLOCK = f"""{BLOCK_BEGIN}
# AMCT layers (Quant, DeQuant, AntiQuant, IFMR, SearchN) call libquant: quant_lib/, include/amct/capi.h.
# They need C++11; the standard is raised only when the compiler's default is older.
AMCT_CXX_DEFAULT_STD := $(shell echo __cplusplus | $(CXX) -x c++ -E -P - 2>/dev/null | tr -dc 0-9)
ifeq ($(shell [ "0$(AMCT_CXX_DEFAULT_STD)" -lt 201103 ] && echo old),old)
  COMMON_FLAGS += -std=c++11
endif
LIBRARY_DIRS += $(CURDIR)/quant_lib
LIBRARIES += quant
LDFLAGS += -Wl,-rpath,$(CURDIR)/quant_lib
{BLOCK_END}
"""

CMAKE_BLOCK = f"""{BLOCK_BEGIN}
# AMCT layers (Quant, DeQuant, AntiQuant, IFMR, SearchN) call libquant: quant_lib/, include/amct/capi.h.
# They need C++11; the standard is raised only when the flags so far leave the compiler below it.
include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "${{CMAKE_CXX_FLAGS}}")
check_cxx_source_compiles("#if __cplusplus < 201103L
#error needs C++11
#endif
int main() {{ return 0; }}" AMCT_CXX11_DEFAULT)
unset(CMAKE_REQUIRED_FLAGS)
if(NOT AMCT_CXX11_DEFAULT)
  set(CMAKE_CXX_FLAGS "${{CMAKE_CXX_FLAGS}} -std=c++11")
endif()
link_libraries("${{PROJECT_SOURCE_DIR}}/{QUANT_LIB_REL.as_posix()}")
{BLOCK_END}
"""


class InstallError(RuntimeError):
    """The tree or our package is not as expected; nothing was changed (or everything was restored)."""


@dataclass
class Change:
    """One file to write: ``data`` replaces (or creates) ``path``."""

    path: Path
    data: bytes
    mode: int | None = None


@dataclass
class Plan:
    """Every change of one install, grouped by the step that prints it."""

    caffe_dir: Path
    copies: list[Change] = field(default_factory=list)
    patches: list[tuple[str, list[Change]]] = field(default_factory=list)  # (name, changes); [] = applied
    proto: list[Change] = field(default_factory=list)  # [backup, merged caffe.proto] or []
    proto_messages: list[str] = field(default_factory=list)
    build_files: list[tuple[str, Change | None]] = field(default_factory=list)  # (name, change or None)


# ------------------------------------------------------------------ pure text edits
def _with_block(text: str, block: str, anchor: re.Pattern, what: str) -> str:
    """``text`` with our marked block: replaced in place if present, else inserted before ``anchor``."""
    begin, end = text.find(BLOCK_BEGIN), text.find(BLOCK_END)
    if begin >= 0 and end > begin:
        rest = text[end + len(BLOCK_END):]
        return text[:begin] + block + (rest[1:] if rest.startswith("\n") else rest)
    if begin >= 0 or end >= 0:
        raise InstallError(f"{what}: only one of the markers '{BLOCK_BEGIN}' / '{BLOCK_END}' is present; "
                           "restore the file from its original and run install.py again")
    m = anchor.search(text)
    if m is None:
        raise InstallError(f"{what}: cannot find where to add the AMCT build settings "
                           f"(looked for {anchor.pattern!r}); add this block by hand:\n{block}")
    return text[:m.start()] + block + text[m.start():]


def patch_makefile(text: str) -> str:
    """Caffe's Makefile with the AMCT block before "# Complete build flags." (else the first LDFLAGS +=)."""
    anchor = re.compile(r"(?m)^# Complete build flags\.")
    if anchor.search(text) is None:
        anchor = re.compile(r"(?m)^LDFLAGS\s*\+=")
    return _with_block(text, MAKEFILE_BLOCK, anchor, "Makefile")


def patch_cmakelists(text: str) -> str:
    """Caffe's top CMakeLists.txt with the AMCT block before the first ``add_subdirectory(``."""
    return _with_block(text, CMAKE_BLOCK, re.compile(r"(?m)^[ \t]*add_subdirectory\s*\("), "CMakeLists.txt")


# ------------------------------------------------------------------ locating our inputs
def find_quant_lib() -> tuple[Path, Path]:
    """(libquant.so, capi.h) to install; see the module doc for the search order."""
    packaged = PATCH_ROOT / "quant_lib"
    if (packaged / "libquant.so").is_file() and (packaged / "capi.h").is_file():
        return packaged / "libquant.so", packaged / "capi.h"
    header = REPO_ROOT / "csrc/include/amct/capi.h"
    roots = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    for root in roots:
        lib = Path(root or ".") / "amct_caffe/lib/libquant.so"
        if lib.is_file() and header.is_file():
            return lib.resolve(), header
    raise InstallError("libquant.so not found: install amct_caffe first (`pip install .` in the repository "
                       "builds amct_caffe/lib/libquant.so), or put libquant.so and capi.h into "
                       f"{packaged}")


def _default_merge(base_text: str, amct_text: str, custom_text: str | None):
    from caffe_patch.merge_proto import merge_protos  # noqa: PLC0415 (install.py imports us before sys.path is final)
    return merge_protos(base_text, amct_text, custom_text)


# ------------------------------------------------------------------ planning
def _change_if_different(path: Path, data: bytes, mode: int | None = None) -> Change | None:
    if path.is_file() and path.read_bytes() == data and (mode is None or path.stat().st_mode & 0o777 == mode):
        return None
    return Change(path, data, mode)


def _plan_copies(caffe_dir: Path, lib: Path, header: Path) -> list[Change]:
    changes = []
    for top in ("include", "src"):
        for src in sorted((PATCH_ROOT / top).rglob("*")):
            if not src.is_file() or "__pycache__" in src.parts:
                continue
            dst = caffe_dir / src.relative_to(PATCH_ROOT)
            data = src.read_bytes()
            if dst.is_file() and dst.read_bytes() != data:
                first = dst.read_text(errors="replace").split("\n", 1)[0]
                if SOURCE_MARKER not in first:
                    raise InstallError(f"{dst} exists and is not an amct_caffe file; rename that layer or "
                                       "remove the file, then run install.py again")
            changes.append(_change_if_different(dst, data))
    changes.append(_change_if_different(caffe_dir / CAPI_REL, header.read_bytes()))
    changes.append(_change_if_different(caffe_dir / QUANT_LIB_REL, lib.read_bytes(), 0o755))
    return [c for c in changes if c is not None]


def _patch_targets(patch_text: str) -> list[str]:
    return sorted({m.group(1).split("/", 1)[1] for m in re.finditer(r"(?m)^\+\+\+ (\S+)", patch_text)
                   if "/" in m.group(1)})


def _run_patch(patch_file: Path, directory: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["patch", "-p1", "--batch", "--silent", "--fuzz=0", "-d", str(directory), "-i", str(patch_file),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _plan_patch(caffe_dir: Path, patch_file: Path) -> list[Change]:
    """Changes of one patch: [] when already applied; computed on a scratch copy of its targets."""
    if shutil.which("patch") is None:
        raise InstallError("the 'patch' program is needed to install caffe_patch/patch/*.patch")
    if _run_patch(patch_file, caffe_dir, "--dry-run", "-R", "-f").returncode == 0:
        return []
    targets = _patch_targets(patch_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for rel in targets:
            if (caffe_dir / rel).is_file():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(caffe_dir / rel, Path(tmp) / rel)
        res = _run_patch(patch_file, Path(tmp), "--forward", "--no-backup-if-mismatch")
        if res.returncode != 0:
            why = (res.stdout + res.stderr).strip()
            raise InstallError(f"Install patch '{patch_file.name}' failed: {why}")
        return [Change(caffe_dir / rel, (Path(tmp) / rel).read_bytes()) for rel in targets
                if (Path(tmp) / rel).is_file()]


def _plan_proto(plan: Plan, custom_proto: Path | None, merge) -> None:
    proto = plan.caffe_dir / PROTO_REL
    base = proto.read_text(encoding="utf-8")
    custom = custom_proto.read_text(encoding="utf-8") if custom_proto else None
    from caffe_patch.merge_proto import default_amct_proto  # noqa: PLC0415 (see _default_merge)
    try:
        amct_text = default_amct_proto().read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InstallError(str(exc)) from None
    result = merge(base, amct_text, custom)
    plan.proto_messages = [f"[WARNING]{n}" for n in getattr(result, "notices", [])]
    added = list(getattr(result, "added", []))
    if added:
        plan.proto_messages.append(f"[INFO]Added to caffe.proto: {', '.join(map(str, added))}")
    if result.text == base:
        return
    stamp = time.strftime("%Y%m%d%H%M%S")
    backup = proto.with_name(f"caffe.proto.{stamp}.bak")
    i = 1
    while backup.exists():
        backup, i = proto.with_name(f"caffe.proto.{stamp}_{i}.bak"), i + 1
    plan.proto = [Change(backup, base.encode("utf-8")), Change(proto, result.text.encode("utf-8"))]


def make_plan(caffe_dir, custom_proto=None, merge: Callable | None = None,
              patch_dir: Path = PATCH_ROOT / "patch") -> Plan:
    """Everything ``install`` would change, computed without touching the tree."""
    caffe_dir = Path(caffe_dir).resolve()
    if not (caffe_dir / PROTO_REL).is_file():
        raise InstallError(f"--caffe_dir {caffe_dir} is not a Caffe source tree (no {PROTO_REL})")
    if custom_proto is not None:
        custom_proto = Path(custom_proto)
        if not custom_proto.is_file():
            raise InstallError(f"--custom_proto {custom_proto} does not exist")
    builds = [(n, caffe_dir / n) for n in ("Makefile", "CMakeLists.txt") if (caffe_dir / n).is_file()]
    if not builds:
        raise InstallError(f"{caffe_dir} has neither a Makefile nor a CMakeLists.txt to patch")
    plan = Plan(caffe_dir)
    lib, header = find_quant_lib()
    plan.copies = _plan_copies(caffe_dir, lib, header)
    plan.patches = [(p.name, _plan_patch(caffe_dir, p)) for p in sorted(Path(patch_dir).glob("*.patch"))]
    _plan_proto(plan, custom_proto, merge or _default_merge)
    for name, path in builds:
        edit = patch_makefile if name == "Makefile" else patch_cmakelists
        text = path.read_text(encoding="utf-8")
        plan.build_files.append((name, _change_if_different(path, edit(text).encode("utf-8"))))
    return plan


# ------------------------------------------------------------------ applying
class Transaction:
    """Writes files atomically and remembers how to undo each write (and each directory it made)."""

    def __init__(self) -> None:
        self._undo: list[tuple[Path, bytes | None, int | None]] = []
        self._made_dirs: list[Path] = []

    def write(self, change: Change) -> None:
        path = change.path
        missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs += missing
        if path.exists():
            self._undo.append((path, path.read_bytes(), path.stat().st_mode & 0o7777))
        else:
            self._undo.append((path, None, None))
        mode = change.mode if change.mode is not None else (path.stat().st_mode & 0o7777 if path.exists()
                                                            else 0o644)
        _atomic_write(path, change.data, mode)

    def rollback(self) -> None:
        for path, data, mode in reversed(self._undo):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                _atomic_write(path, data, mode)
        for d in sorted(self._made_dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply_plan(plan: Plan, report: Callable[[str], None]) -> None:
    """Write the plan, printing the guide's [INFO] lines; on any failure restore everything and re-raise."""
    tx = Transaction()
    where = plan.caffe_dir
    try:
        report(f"[INFO]Begin to copy source files, header files and quant_lib to '{where}'")
        for change in plan.copies:
            tx.write(change)
        report(f"[INFO]Finish copy source files, header files and quant_lib to '{where}'")
        report("[INFO]Begin to install patch.")
        for name, changes in plan.patches:
            for change in changes:
                tx.write(change)
            report(f"[INFO]Install patch '{name}' successfully." if changes
                   else f"[INFO]Patch '{name}' is already installed.")
        report("[INFO]Finish install patch.")
        for line in plan.proto_messages:
            report(line)
        for change in plan.proto:
            tx.write(change)
        report('[INFO]Merge and replace "caffe.proto" success.' if plan.proto
               else '[INFO]"caffe.proto" already holds the merged definitions; not replaced.')
        for name, change in plan.build_files:
            if change is not None:
                tx.write(change)
            report(f'[INFO]Merge and replace "{name}" success.' if change is not None
                   else f'[INFO]"{name}" is already patched; not modified.')
    except BaseException:
        tx.rollback()
        raise


def install(caffe_dir, custom_proto=None, report: Callable[[str], None] = lambda line: None,
            merge: Callable | None = None, patch_dir: Path = PATCH_ROOT / "patch") -> Plan:
    """Plan, then apply (see the module doc). Returns the plan that was applied."""
    plan = make_plan(caffe_dir, custom_proto, merge, patch_dir)
    apply_plan(plan, report)
    return plan
