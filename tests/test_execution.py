"""What a model program does follows from how its module is built (``models/execution.py``).

The mesh, the sharding rules and the platform are fields of the module's ``Execution``, so a plain
``jax.jit(module.apply)`` traces the activation constraints of a module built for a mesh, and none of a
module built without one; the platform is the mesh devices' (8 fake CPU devices, see conftest). Only
lowered, on abstract parameters: nothing is compiled or allocated.
"""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir

from cogvlm_jax.config import load_config
from cogvlm_jax.models.cogvlm import CogVLM, _dummy_inputs, abstract_params
from cogvlm_jax.models.execution import Execution
from cogvlm_jax.parallel import axes, program, rows


@pytest.fixture(scope="module")
def config():
    return load_config(os.path.join(fixture_dir("cogvlm2"), "checkpoint"))


def _constraints(module, config, method=None, args=None) -> int:
    """How many sharding constraints the lowered ``jax.jit(module.apply)`` holds (Shardy's
    ``sdy.sharding_constraint``, or GSPMD's ``@Sharding`` custom call)."""
    params = {"params": abstract_params(config)}
    args = _dummy_inputs(config, batch=4) if args is None else args
    apply = jax.jit(module.apply if method is None else lambda p, *a: module.apply(p, *a, method=method))
    text = apply.lower(params, *args).as_text()
    return text.count("sdy.sharding_constraint") + text.count("@Sharding")


def test_plain_jit_of_a_module_built_for_a_mesh_keeps_its_constraints(config):
    mesh = axes.make_mesh(2, 2, 2)
    on_mesh = CogVLM(config, execution=program.execution(mesh))
    # one on the input of every linear (ViT: 2 blocks x 4, adapter: 4, decoder: 2 layers x 5 per expert,
    # lm_head) and on the output of each projection back to the model width
    assert _constraints(on_mesh, config) > 2 * 4 + 4 + 2 * 5 + 1
    assert _constraints(CogVLM(config), config) == 0
    assert _constraints(CogVLM(config, execution=program.execution()), config) == 0
    # the one-token decode step too
    cache_args = jax.eval_shape(lambda: _decode_args(config))
    assert _constraints(on_mesh, config, CogVLM.decode_step, cache_args) > 0
    assert _constraints(CogVLM(config), config, CogVLM.decode_step, cache_args) == 0


def _decode_args(config):
    from cogvlm_jax.models import kv_cache

    t = config.text
    cache = kv_cache.init_cache(t.num_layers, 4, 32, t.num_kv_heads, t.head_dim, jnp.float32)
    return jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32), cache


def test_execution_for_a_mesh_has_its_devices_platform():
    mesh = axes.make_mesh(1, 1, 8)
    ex = program.execution(mesh)
    assert ex.mesh is mesh and ex.platform == mesh.devices.flat[0].platform == "cpu"
    assert dict(ex.rules) == axes.RULES
    assert program.execution().platform == jax.devices()[0].platform and program.execution().mesh is None
    # hashable and compared by value: two modules built alike are one program's module
    assert hash(ex) == hash(program.execution(mesh)) and ex == program.execution(mesh)
    assert ex.replace(weight_lhs=True) != ex
    with pytest.raises(ValueError, match="platform 'tpu'"):
        Execution(mesh=mesh, rules=axes.RULES, platform="tpu")


def test_the_platform_comes_from_the_mesh_not_the_host():
    """A mesh of another platform's devices (a stand-in here) gets that platform's compiler options,
    whatever this host's default backend is."""
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")], dtype=object))
    assert program.platform_of(tpu) == "tpu"
    assert program.compiler_options("tpu") is None
    assert program.compiler_options("cpu") in (None, program.CPU_OPTIONS)  # None: a jaxlib without the option
    assert rows.few_rows(8, "cpu") and not rows.few_rows(8, "tpu")


def test_few_row_variant_is_a_module_field(config):
    module = CogVLM(config, execution=program.execution())
    plain, few = rows.variants(module)[False], rows.variants(module)[True]
    assert not plain.execution.weight_lhs and few.execution.weight_lhs
    assert plain == module and few.execution.replace(weight_lhs=False) == module.execution
