"""TotalSegmentator-style parts merged into one label map: each part's classes mapped to the merged values, a
later part's foreground written over earlier ones, background never written."""
from __future__ import annotations

import numpy as np

from PTQLogic.inference.nnunet.segment import _merge


def _reference(parts, lookups, dtype):
    merged = np.zeros(parts[0].shape, dtype)
    for labels, lookup in zip(parts, lookups):
        for part_value, merged_value in enumerate(lookup):
            if part_value:
                merged[labels == part_value] = merged_value
    return merged


def test_merge_maps_parts_and_lets_later_foreground_win():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 4, (6, 7, 8), dtype=np.uint8), rng.integers(0, 3, (6, 7, 8), dtype=np.uint8)]
    lookups = [np.array([0, 5, 6, 7], np.uint8), np.array([0, 1, 2], np.uint8)]
    before = [labels.copy() for labels in parts]
    merged = _merge(parts, lookups, 8)
    assert merged.dtype == np.uint8
    np.testing.assert_array_equal(merged, _reference(parts, lookups, np.uint8))
    assert set(np.unique(merged)) == {0, 1, 2, 5, 6, 7}
    assert all(np.array_equal(a, b) for a, b in zip(parts, before))  # the parts are left as they were
    single = _merge(parts[:1], lookups[:1], 8)
    np.testing.assert_array_equal(single, _reference(parts[:1], lookups[:1], np.uint8))
    assert not np.shares_memory(single, parts[0])


def test_merge_never_writes_a_parts_background_and_widens_for_many_classes():
    labels = np.array([[[0, 1, 2]]], np.uint8)
    odd = np.array([9, 3, 4], np.uint16)  # a lookup whose background is not 0: background still stays 0
    np.testing.assert_array_equal(_merge([labels], [odd], 300), [[[0, 3, 4]]])
    assert _merge([labels], [np.array([0, 280, 290])], 300).dtype == np.uint16
