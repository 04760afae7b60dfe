"""Expert routing, position ids and masks (DESIGN facts 3 and 4)."""

import numpy as np

from cogvlm_jax.positions import causal_mask, position_ids, vision_expert_mask


def test_design_example_positions():
    tt = np.array([[0, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(position_ids(tt, np.ones_like(tt)), [[0, 1, 2, 2, 2, 3, 4, 5]])


def test_left_padding_does_not_shift_positions():
    tt = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]])
    am = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids(tt, am)[0, 2:], [0, 1, 2, 2, 2, 3, 4, 5])
    # A pad marked as image type must not count either.
    tt2 = tt.copy()
    tt2[0, 1] = 1
    np.testing.assert_array_equal(position_ids(tt2, am), position_ids(tt, am))


def test_text_only_positions_are_arange():
    tt = np.zeros((1, 6), int)
    np.testing.assert_array_equal(position_ids(tt, np.ones_like(tt)), [np.arange(6)])


def test_expert_mask_boi_patches_vision_eoi_language():
    tt = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(vision_expert_mask(tt), [[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])


def test_causal_mask_hides_pads_and_future():
    m = np.asarray(causal_mask(np.array([[0, 1, 1]])))[0]
    np.testing.assert_array_equal(m, [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
