"""The executor computes what official Caffe computes, blob by blob, on every shared model."""

import pytest

from tests.golden import CASES, compare, golden_blob_names, run_case


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_blob_matches_caffe(case):
    if not case.golden.exists() or not case.prototxt.exists():
        pytest.skip(f"{case.golden} or {case.prototxt} missing (../shared not beside the repo?)")
    net, z = run_case(case)
    names = golden_blob_names(z)
    missing = [n for n in names if n not in net.blobs]
    assert not missing, f"blobs Caffe has and we lack: {missing}"
    failures = []
    for name in names:
        err, allowed = compare(name, net.blobs[name].data, z)
        if not err <= allowed:
            failures.append(f"{name}: max err {err:.3g} > {allowed:.3g}")
    assert not failures, "\n".join(failures)
