"""One process of the two-process float64 run that tests/test_float64.py starts (not a test module).

    python tests/multihost_f64_worker.py COORDINATOR PROCESS_ID WORKDIR

The parent sets XLA_FLAGS (4 CPU devices), JAX_PLATFORMS=cpu and JAX_ENABLE_X64=1 (the reference mode's
documented switch) before this starts. It loads the HF checkpoint ``WORKDIR/job.json`` names in float64 on
a (1, 4, 2) mesh over both processes (fsdp spans them) and writes the logits of ``WORKDIR/batch.npz`` to
``WORKDIR/out_{PROCESS_ID}.npz``.
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402


def main(coordinator: str, process_id: int, workdir: str) -> None:
    from cogvlm_jax.parallel.multihost import initialize

    initialize(coordinator, 2, process_id, timeout=60)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and jax.config.jax_enable_x64

    import cogvlm_jax

    with open(os.path.join(workdir, "job.json")) as f:
        job = json.load(f)
    batch = dict(np.load(os.path.join(workdir, "batch.npz")))
    model = cogvlm_jax.load(job["checkpoint"], dtype="float64", mesh=cogvlm_jax.make_mesh(*job["mesh"]),
                            progress=False)
    logits = model.forward(*(batch.get(k) for k in ("ids", "tt", "am", "pix")))
    np.savez(os.path.join(workdir, f"out_{process_id}.npz"), logits=logits)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
