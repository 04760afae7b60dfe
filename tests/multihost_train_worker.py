"""One process of the two-process training run that tests/test_multihost_train.py starts (not a test module).

    python tests/multihost_train_worker.py COORDINATOR PROCESS_ID WORKDIR

The parent sets XLA_FLAGS (4 CPU devices) and JAX_PLATFORMS=cpu before this starts. ``WORKDIR/job.json``
holds the ``cogvlm-jax train`` arguments of a new run (``train``, without the multi-process flags) and
two run directories:

1. ``cogvlm-jax train ARGS --coordinator .. --num-processes 2 --process-id I`` (``cli.main`` in this
   process): joins the cluster, trains on the default mesh (fsdp over the two processes), checkpoints
   after every step, exports the model. Its answer (the export's path) goes to this process's stdout.
2. Process 0 copies the run without its last checkpoint and export to ``resumed``; both processes then
   continue that copy with ``finetune.fit(resume=True)``: new trainers, the state restored from the disk.
3. Both start a new run in the first run's directory, which process 0 refuses (the error, on both).

``WORKDIR/done_{PROCESS_ID}.json`` gets the return codes, the seconds each part took and the refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time


def main(coordinator: str, process_id: int, workdir: str) -> None:
    from cogvlm_jax import cli
    from cogvlm_jax.parallel import multihost
    from cogvlm_jax.training import run as finetune

    with open(os.path.join(workdir, "job.json")) as f:
        job = json.load(f)
    done = {}
    t0 = time.time()
    done["train_rc"] = cli.main(job["train"] + ["--coordinator", coordinator, "--num-processes", "2",
                                                "--process-id", str(process_id), "--init-timeout", "60"])
    done["train_seconds"] = time.time() - t0
    if done["train_rc"] == 0:
        t1 = time.time()
        first, resumed = job["first"], job["resumed"]
        barriers = multihost.Barriers.agreed()
        if multihost.is_main_process():
            last = finetune.checkpoint_steps(first)[-1]
            shutil.copytree(first, resumed, ignore=shutil.ignore_patterns(f"step_{last:08d}", finetune.EXPORT))
        barriers.sync("copied")
        finetune.fit(resumed, resume=True, progress=False)
        done["resume_seconds"] = time.time() - t1
        try:  # a new run where one is: process 0 looks, and every process must raise its refusal
            finetune.fit(first, finetune.read_run(first), progress=False)
        except ValueError as e:
            done["refused"] = str(e)
    with open(os.path.join(workdir, f"done_{process_id}.json"), "w") as f:
        json.dump(done, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
