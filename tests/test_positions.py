"""Expert routing, position ids and masks: boi and the patches go to the vision expert, eoi and the text to
the language expert; boi and eoi take a position each, the patches between them share one."""

import numpy as np

from cogvlm_jax.models.positions import causal_mask, expert_route, position_ids, vision_expert_mask


def test_image_patches_share_one_position():
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


def test_expert_route_puts_each_rows_vision_run_last_and_back():
    # boi + 3 patches (span 4) then eoi; a left-padded row; a row whose run starts at 0
    tt = np.array([[0, 1, 1, 1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 0, 1, 1, 1, 1, 1],
                   [1, 1, 1, 1, 1, 0, 0, 0, 0]])
    tt[1, -1] = 0
    tt[1, 3] = 1
    r = expert_route(tt, 4)
    order, restore, mask = np.asarray(r.order), np.asarray(r.restore), np.asarray(r.mask)
    assert bool(r.split)
    x = np.arange(27).reshape(3, 9)
    for b in range(3):
        assert sorted(order[b]) == list(range(9)) and (order[b][restore[b]] == np.arange(9)).all()
        assert mask[b][order[b][-4:]].all() and not mask[b][order[b][:-4]].any()  # the run last, the rest in order
        assert (np.diff(order[b][:-4]) > 0).all() and (np.diff(order[b][-4:]) == 1).all()
    np.testing.assert_array_equal(np.take_along_axis(np.take_along_axis(x, order, 1), restore, 1), x)


def test_expert_route_splits_only_when_every_row_has_its_whole_run():
    image = [0, 1, 1, 1, 1, 1, 0, 0]
    assert bool(expert_route(np.array([image, image]), 4).split)
    assert not bool(expert_route(np.array([image, [0] * 8]), 4).split)  # a text-only row
    assert not bool(expert_route(np.array([image]), 5).split)  # a run shorter than the span
    assert not bool(expert_route(np.array([[0, 1, 1, 0, 1, 1, 1, 0]]), 3).split)  # two runs, 3 vision tokens
    short = expert_route(np.array([image]), 8)  # no room for a split: the select path only
    assert short.order is None and not bool(short.split)
