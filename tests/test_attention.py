"""Decode attention over a heads-major cache, read in blocks up to its filled part, equals plain attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cogvlm_jax.models.attention import attend, attend_cache


@pytest.mark.parametrize("t,filled", [(64, 64), (64, 9), (72, 72), (72, 70), (72, 33), (40, 5)])
def test_blocked_cache_read_equals_full_attention(t, filled):
    """Blocks of 16 slots: T a multiple of the block or not (the last block shifted back), the filled
    part ending inside a block or at T. Slots past ``filled`` hold garbage and are masked, as in a cache."""
    rng = np.random.default_rng(t * 100 + filled)
    b, h, kh, e = 3, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, 1, h, e)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kh, t, e)) * 3, jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kh, t, e)), jnp.float32)
    mask = np.zeros((b, 1, t), bool)
    for row, n in enumerate((filled, max(1, filled // 2), max(1, filled - 3))):  # rows filled to different depths
        mask[row, 0, :n] = rng.random(n) < 0.8
        mask[row, 0, n - 1] = True  # the token just written
    want = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), jnp.asarray(mask))
    got = jax.jit(lambda *a: attend_cache(*a, chunk=16))(q, k, v, jnp.asarray(mask), jnp.int32(filled))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)
    # Reading a whole block too few would change the rows filled deepest.
    if filled > 16:
        short = attend_cache(q, k, v, jnp.asarray(mask), jnp.int32(filled - 16), chunk=16)
        assert np.abs(np.asarray(short) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("t", [144, 512])
def test_bfloat16_cache_attention_at_batch_8(t):
    """A bfloat16 cache read whole (T <= CACHE_CHUNK) or in blocks, at batch 8: XLA:CPU's own widening of
    16-bit dot operands failed at run time for the whole read ("Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"), so ``layers.operands`` widens them. The result is the float32
    attention of the bfloat16-rounded inputs, up to the rounding of the probabilities."""
    rng = np.random.default_rng(t)
    b, h, kh, e = 8, 16, 4, 64
    q = jnp.asarray(rng.standard_normal((b, 1, h, e)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, kh, t, e)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, kh, t, e)), jnp.bfloat16)
    mask = jnp.asarray(rng.random((b, 1, t)) < 0.7)
    got = jax.jit(attend_cache)(q, k, v, mask, jnp.int32(t))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = attend(f32[0], jnp.swapaxes(f32[1], 1, 2), jnp.swapaxes(f32[2], 1, 2), mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
