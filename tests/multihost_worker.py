"""One process of the two-process CPU cluster that tests/test_multihost.py starts (not a test module).

    python tests/multihost_worker.py COORDINATOR PROCESS_ID WORKDIR

The parent sets XLA_FLAGS (4 CPU devices) and JAX_PLATFORMS=cpu before this starts. ``WORKDIR/job.json``
lists the runs: for each mesh and family, load the HF checkpoint on the mesh (counting the bytes this
process reads), forward and greedy-generate the family's batch (``WORKDIR/batch_{family}.npz``); for
the families with an Orbax checkpoint, load it on the last mesh too and compare every local shard with
the HF load, and count what a load reads (/proc/self/io). Results go to ``WORKDIR/out_{PROCESS_ID}.npz``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402


def share_bytes(path, config, mesh) -> tuple[int, int]:
    """(bytes of the HF checkpoint behind this process's distinct regions, bytes of its largest tensor)."""
    from cogvlm_jax.convert import mapping
    from cogvlm_jax.convert.convert_hf import open_tensors
    from flax.traverse_util import flatten_dict

    from cogvlm_jax.parallel.sharding import param_shardings

    shardings = flatten_dict(param_shardings(config, mesh))
    total = largest = 0
    for key, (_, info) in open_tensors(path).items():
        nbytes = info.nbytes
        largest = max(largest, nbytes)
        ours, transform = mapping.hf_to_ours_key(key)
        if ours is None:  # rotary buffer: read whole for its check
            total += nbytes
            continue
        shape = mapping.ours_shape(info.shape, transform)
        per_elem = nbytes // int(np.prod(shape))
        regions = {tuple(s.indices(n)[:2] for s, n in zip(idx, shape))
                   for idx in shardings[ours].addressable_devices_indices_map(shape).values()}
        total += sum(int(np.prod([b - a for a, b in r])) * per_elem for r in regions)
    return total, largest


def io_read_bytes() -> int:
    """Bytes this process has read through read(2)-like calls (all threads): /proc/self/io rchar."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(coordinator: str, process_id: int, workdir: str) -> None:
    from cogvlm_jax.parallel.multihost import initialize

    t0 = time.time()
    initialize(coordinator, 2, process_id, timeout=60)
    print(f"process {process_id}: joined in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and jax.local_device_count() == 4

    from conftest import SafetensorsReads

    import cogvlm_jax

    reads = SafetensorsReads().install()

    with open(os.path.join(workdir, "job.json")) as f:
        job = json.load(f)
    out = {}
    models = {}
    for mesh_shape in job["meshes"]:
        mesh = cogvlm_jax.make_mesh(*mesh_shape)
        tag = "x".join(map(str, mesh_shape))
        for fam, spec in job["families"].items():
            batch = dict(np.load(os.path.join(workdir, f"batch_{fam}.npz")))
            batch = [batch[k] if k in batch else None for k in ("ids", "tt", "am", "pix")]
            t = time.time()
            reads.bytes = 0
            model = cogvlm_jax.load(spec["hf"], mesh=mesh, progress=False)
            out[f"{fam}/{tag}/bytes_read"] = reads.bytes
            out[f"{fam}/{tag}/share"], out[f"{fam}/{tag}/largest"] = share_bytes(spec["hf"], model.config, mesh)
            t1 = time.time()
            out[f"{fam}/{tag}/logits"] = model.forward(*batch)
            t2 = time.time()
            out[f"{fam}/{tag}/ids"] = model.generate(*batch, max_new_tokens=job["max_new_tokens"])
            print(f"process {process_id} {fam} {tag}: load {t1 - t:.1f} s, forward {t2 - t1:.1f} s, "
                  f"generate {time.time() - t2:.1f} s", file=sys.stderr, flush=True)
            models[fam] = model
    for fam, spec in job["families"].items():  # our Orbax format, on the last mesh
        if not spec.get("ours"):
            continue
        hf_model = models[fam]
        # The first load also reads the modules an Orbax restore imports lazily; count the second.
        model = cogvlm_jax.load(spec["ours"], mesh=hf_model.mesh, progress=False)
        mismatched = 0
        for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(hf_model.params)):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
            for sa, sb in zip(a.addressable_shards, b.addressable_shards):
                mismatched += int(sa.index != sb.index or not np.array_equal(np.asarray(sa.data), np.asarray(sb.data)))
        out[f"{fam}/ours/mismatched_shards"] = mismatched
        before = io_read_bytes()
        cogvlm_jax.load(spec["ours"], mesh=hf_model.mesh, progress=False)
        out[f"{fam}/ours/io_bytes"] = io_read_bytes() - before
    out["seconds"] = time.time() - t0
    np.savez(os.path.join(workdir, f"out_{process_id}.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
