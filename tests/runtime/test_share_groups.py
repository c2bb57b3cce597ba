"""ShareGroups: the blobs a Net treats as one memory (Caffe's ShareData), as a union-find."""

from amct_caffe.runtime.share_groups import ShareGroups


def test_joins_merge_whole_groups_and_list_every_member():
    groups = ShareGroups()
    groups.join("flat", "conv")      # Flatten: flat is conv's memory
    groups.join("reshaped", "flat")  # a Reshape of that
    groups.join("h", "c")            # an unrelated pair
    groups.join("c", "conv")         # then joined to the first group: one group of five
    members = groups.members()
    assert set(members) == {"flat", "conv", "reshaped", "h", "c"}
    assert all(sorted(m) == ["c", "conv", "flat", "h", "reshaped"] for m in members.values())
    assert members["flat"] == ["flat", "conv", "reshaped", "h", "c"]  # the order blobs were first joined


def test_separate_groups_stay_apart_and_unjoined_blobs_are_absent():
    groups = ShareGroups()
    groups.join("a", "b")
    groups.join("x", "y")
    groups.join("b", "a")  # joining again changes nothing
    members = groups.members()
    assert members["a"] == members["b"] == ["a", "b"]
    assert members["x"] == members["y"] == ["x", "y"]
    assert "z" not in members
