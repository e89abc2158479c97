"""PlaceLinks: which database positions are one place, from accepted loops only (engine ambiguity/consistency)."""

from __future__ import annotations

from feature_matching_ros.engine.keyframe_graph import PlaceLinks


def test_a_third_visit_links_both_earlier_visits_through_the_accepted_loop():
    places = PlaceLinks()
    # Visit 1 at positions 0..10, visit 2 at 100..110 closed a loop 104 -> 3; visit 3 sees both.
    assert places.linked(3, 5, window=5) and not places.linked(3, 104, window=5)
    places.add(3, 104)
    assert places.linked(1, 107, window=5) and places.linked(107, 1, window=5)  # either end, within the window
    assert not places.linked(20, 104, window=5)  # 20 is beyond the window of the loop's end at 3


def test_links_chain_only_up_to_max_hops():
    places = PlaceLinks(max_hops=2)
    places.add(0, 100)
    places.add(100, 200)
    places.add(200, 300)
    assert places.linked(0, 200, window=2)  # two accepted loops
    assert not places.linked(0, 300, window=2)  # three: too far to call one place without poses
    longer = PlaceLinks(max_hops=3)
    for a, b in ((0, 100), (100, 200), (200, 300)):
        longer.add(a, b)
    assert longer.linked(0, 300, window=2)
