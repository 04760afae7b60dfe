"""The CPU int8/int4 kernel (``models/int8_cpu.py``, ``csrc/int8_cpu.cc``): its products equal XLA's, the
model decodes the same greedy ids with it as without, and it is used only where ``int8_cpu.applies``.

The kernel and XLA's product (``int8_cpu.reference``) compute the same float32 products in different
summation orders. For a dot of ``D`` terms each order is within ``gamma_D * sum_i |x_i w_i|`` of the exact
sum (``gamma_n = n u / (1 - n u)``, ``u = 2^-24``; Higham, Accuracy and Stability, 3.1), and the int8 output
scale adds one rounding to each, so the two differ by at most ``2 gamma_(D+1) sum_i |x_i| |w_i|`` with ``w``
the dequantized weights (int4: ``q * scale`` is rounded identically by both before the sum). That bound
holds for any vector width or FMA use, so it holds on every x86-64 CPU; an index or scale error in the
kernel is orders of magnitude above it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cases, fixture_dir, left_pad_batch

import cogvlm_jax
from cogvlm_jax.models import int8_cpu
from cogvlm_jax.models import quantize as ql
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.models.layers import Dense
from cogvlm_jax.parallel import program
from cogvlm_jax.parallel.axes import make_mesh

pytestmark = pytest.mark.skipif(not int8_cpu.available(), reason="the CPU kernel library is not built")

U = 2.0 ** -24


def _held(rng, fmt, out, d):
    quant = ql.make(fmt, platform="cpu")
    q, s = ql.quantize(rng.standard_normal((out, d)).astype(np.float32), 1, fmt)
    return quant, ql.held(q, 1, quant), s


def _dequantized(kernel, scale, quant):
    """The float32 weights a held kernel stands for, as both products round them (numpy)."""
    q = ql.unpack(np.asarray(kernel), 1) if quant.packed else np.asarray(kernel)
    g = q.shape[1] // scale.shape[1]
    s = np.repeat(np.asarray(scale, np.float32), g, axis=1)
    return q.astype(np.float32) * s


def _bound(x, w):
    """``2 gamma_(D+1) sum_i |x_i| |w_i|`` per output (see the module docstring), in float64."""
    d = x.shape[1]
    gamma = (d + 1) * U / (1 - (d + 1) * U)
    return 2 * gamma * np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


SHAPES = [(37, 256), (7, 66), (300, 200), (1, 1030)]  # (outputs, input width)
ROWS = (1, 2, 3, 5, 64)  # the kernel's row blocks: 1, 2, 3 alone; 4 and a tail of 1; sixteen of 4


@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_the_kernel_equals_the_xla_product(fmt):
    """Odd output counts, widths no vector length divides, several int4 groups (200: two of 100), each of
    the kernel's row blocks; one program per shape."""
    rng = np.random.default_rng(0)
    quant = ql.make(fmt, platform="cpu")
    ends = np.cumsum(ROWS)

    @jax.jit
    def both(x, k, s):
        parts = [x[e - r:e] for r, e in zip(ROWS, ends)]
        return [(int8_cpu.matmul(p, k, s, quant), int8_cpu.reference(p, k, s, quant)) for p in parts]

    for out, d in SHAPES:
        _, kernel, scale = _held(rng, fmt, out, d)
        x = rng.standard_normal((int(ends[-1]), d)).astype(np.float32)
        w = _dequantized(kernel, scale, quant)
        for r, e, (y, ref) in zip(ROWS, ends, both(x, kernel, scale)):
            y, ref = np.asarray(y), np.asarray(ref)
            assert y.shape == ref.shape == (r, out) and y.dtype == np.float32
            err, bound = np.abs(y.astype(np.float64) - ref), _bound(x[e - r:e], w)
            assert (err <= bound).all(), f"{fmt} {r}x{d} @ {out}: max error {err.max()} over bound {bound.max()}"


ISA_CHECK = """
import numpy as np, jax
from cogvlm_jax.models import int8_cpu, quantize as ql
assert int8_cpu.isa() == {isa!r}, int8_cpu.isa()
rng = np.random.default_rng(0)
for fmt in ql.FORMATS:
    quant = ql.make(fmt, platform="cpu")
    for out, d in ((37, 256), (5, 48), (3, 66)):
        q, s = ql.quantize(rng.standard_normal((out, d)).astype(np.float32), 1, fmt)
        k = ql.held(q, 1, quant)
        x = rng.standard_normal((7, d)).astype(np.float32)
        y = np.asarray(int8_cpu.matmul(x, k, s, quant), np.float64)
        ref = np.asarray(int8_cpu.reference(x, k, s, quant), np.float64)
        bound = 2 * (d + 1) * 2.0 ** -24 * 1.01 * np.abs(x) @ np.abs(np.asarray(ql.dequantize(k, s, 1, quant))).T
        assert (np.abs(y - ref) <= bound).all(), (fmt, out, d, np.abs(y - ref).max())
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_instruction_set_version_equals_the_xla_product(isa):
    """The AVX2 and portable versions, on a CPU that would run AVX-512 (``COGVLM_CPU_KERNEL_ISA`` caps the
    choice made when the library loads); widths with a vector-unpacked int4 group (256: 128, 48: 48 on
    AVX2) and one without (66)."""
    if isa == "avx2" and int8_cpu.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, COGVLM_CPU_KERNEL_ISA=isa, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", ISA_CHECK.format(isa=isa)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_its_gradient_is_the_xla_products():
    """QLoRA trains through a frozen quantized base: d/dx and d/dscale of the kernel's product are XLA's."""
    rng = np.random.default_rng(1)
    quant, kernel, scale = _held(rng, "int8", 24, 64)
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))

    def loss(fn):
        return lambda x, s: jnp.sum(jnp.sin(fn(x, kernel, s, quant)))

    got = jax.grad(loss(int8_cpu.matmul), argnums=(0, 1))(x, scale)
    want = jax.grad(loss(int8_cpu.reference), argnums=(0, 1))(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def _dense_hlo(execution, rows: int, d: int = 64, features: int = 48, out_in: bool = True) -> str:
    """The lowered program of one quantized ``Dense`` of ``rows`` rows on ``execution``."""
    dense = Dense(features, ("embed", "mlp"), out_in=out_in, execution=execution)
    x = jnp.ones((1, rows, d), jnp.float32)
    params = jax.eval_shape(lambda: dense.init(jax.random.PRNGKey(0), x))
    return jax.jit(dense.apply).lower(params, x).as_text()


def test_it_is_used_only_for_few_rows_on_one_cpu_device():
    quant = ql.make("int8", platform="cpu")
    ex = Execution(quant=quant)
    assert "cogvlm_int8_matmul" in _dense_hlo(ex, 1)
    assert "cogvlm_int8_matmul" in _dense_hlo(ex, int8_cpu.MAX_ROWS)
    assert "cogvlm_int4_matmul" in _dense_hlo(Execution(quant=ql.make("int4", platform="cpu")), 4)
    # more rows (a prefill), the switch off, an [in, out] kernel (the vision tower), no quantization
    assert "cogvlm_int" not in _dense_hlo(ex, int8_cpu.MAX_ROWS + 1)
    assert "cogvlm_int" not in _dense_hlo(ex.replace(quant_kernel=False), 1)
    assert "cogvlm_int" not in _dense_hlo(ex, 1, out_in=False)
    assert "cogvlm_int" not in _dense_hlo(Execution(), 1)
    # a sharded mesh: XLA's product, which the partitioner splits
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    on_mesh = program.execution(mesh).replace(quant=quant)
    assert not int8_cpu.applies(on_mesh, 1, True)
    with jax.set_mesh(mesh):
        assert "cogvlm_int" not in _dense_hlo(on_mesh, 2)
    # an accelerator's program, whatever the host's backend (int4 there is jnp.int4, not packed pairs)
    for platform in ("tpu", "gpu"):
        for fmt in ql.FORMATS:
            assert not int8_cpu.applies(Execution(platform=platform, quant=ql.make(fmt, platform=platform)), 1, True)


def test_without_the_library_products_fall_back_to_xla_with_a_warning(monkeypatch):
    monkeypatch.setattr(int8_cpu, "_state", {})
    monkeypatch.setattr(int8_cpu, "library_path", lambda: None)
    ex = Execution(quant=ql.make("int8", platform="cpu"))
    with pytest.warns(RuntimeWarning, match="kernel is unavailable"):
        assert not int8_cpu.applies(ex, 1, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every product
        assert "cogvlm_int" not in _dense_hlo(ex, 1)
    with pytest.raises(RuntimeError, match="unavailable"):
        int8_cpu.matmul(jnp.ones((1, 64)), jnp.ones((8, 64), jnp.int8), jnp.ones((8, 1)), ex.quant)


# one format per family, which covers both of each (every generate compiles a prefill and a decode loop)
GREEDY_CASES = (("cogvlm1", "int8"), ("cogvlm2", "int4"))


@pytest.fixture(scope="module")
def with_and_without():
    """{(family, format): (the fixture loaded quantized, the same with ``quant_kernel=False``)}."""
    out = {}
    original = program.execution
    for fam, fmt in GREEDY_CASES:
        ck, tok = (os.path.join(fixture_dir(fam), d) for d in ("checkpoint", "tokenizer"))
        on = cogvlm_jax.load(ck, tokenizer=tok, progress=False, quantize=fmt)
        program.execution = lambda *a, **k: original(*a, quant_kernel=False, **k)
        try:
            off = cogvlm_jax.load(ck, tokenizer=tok, progress=False, quantize=fmt)
        finally:
            program.execution = original
        out[fam, fmt] = on, off
    return out


@pytest.mark.parametrize("fam,fmt", GREEDY_CASES)
def test_greedy_ids_with_the_kernel_equal_those_without(with_and_without, fam, fmt):
    on, off = with_and_without[fam, fmt]
    assert on.module.execution.quant_kernel and not off.module.execution.quant_kernel
    batch = left_pad_batch(cases(fam), on.config.pad_token_id)
    assert int8_cpu.applies(on.module.execution, batch[0].shape[0], True)  # every decode step's products
    np.testing.assert_array_equal(np.asarray(on.generate(*batch, max_new_tokens=16)),
                                  np.asarray(off.generate(*batch, max_new_tokens=16)))
