"""Training across two processes, for real: ``cogvlm-jax train`` on a two-process JAX cluster on 127.0.0.1
(4 CPU devices each, gloo collectives), on its default mesh (data, fsdp, tensor) = (1, 2, 4): fsdp spans
the two processes, tensor stays inside each.

One module fixture starts the pair (tests/multihost_train_worker.py), each killed if it outlives its
deadline: two steps with a checkpoint after each and the export, then the run resumed from its step-1
checkpoint (restored from disk by both processes) to the end. This process trains the same two steps
itself, on the same mesh of 8 devices and on one device, and compares.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import LINEAR_TRAIN, fixture_dir, write_train_data
from flax.traverse_util import flatten_dict
from processes import ROOT, finish, free_port, python, start

DEADLINE_S = 300  # hard limit for each child, well above what the children need
STEPS = 2
# AdamW with eps=1, no clipping, a constant learning rate (tests/test_train_step.py's LINEAR): the first update
# is lr * g / (|g| + 1), 1-Lipschitz in g, so parameters that agree bound how far the gradients differ (with
# eps=1e-8 it is about lr * sign(g), and float reorderings of a near-zero gradient flip it).
OPTIONS = ["--steps", str(STEPS), "--batch-size", "4", "--lr", "1", "--adam-eps", "1", "--max-grad-norm", "0",
           "--end-lr-ratio", "1", "--save-every", "1", "--keep", "2", "--quiet"]
assert LINEAR_TRAIN["total_steps"] == STEPS  # the same TrainConfig: one compiled step with test_train_step.py


def _one_device(work, model):
    """The same run in this process on one device: (losses, the state before and after each step, a target
    to restore the two-process checkpoints into)."""
    from cogvlm_jax.training import trainer as train
    from cogvlm_jax.training.data import Batches, read_jsonl

    batches = Batches(read_jsonl(str(work / "train.jsonl"), model.tokenizer, model.config), model.tokenizer,
                      model.config, batch_size=4, seed=0)
    tr = train.Trainer(model.config, train.TrainConfig(**LINEAR_TRAIN))
    state, frozen = tr.init(model.params)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    losses, states = [], [_leaves(state)]
    for k in range(STEPS):
        state, m = tr.step(state, frozen, tr.place_batch(batches.batch(k)))
        losses.append(float(m["loss"]))
        states.append(_leaves(state))
    return losses, states, like


@pytest.fixture(scope="module")
def runs(tmp_path_factory, f32_models):
    """The two-process run, and meanwhile the same run on one device here."""
    work = tmp_path_factory.mktemp("multihost_train")
    data = write_train_data(work)
    d = fixture_dir("cogvlm1")
    first, resumed = str(work / "first"), str(work / "resumed")
    job = {"train": ["train", "--data", data, "--model", os.path.join(d, "checkpoint"), "--tokenizer",
                     os.path.join(d, "tokenizer"), "--out", first, *OPTIONS],
           "first": first, "resumed": resumed}
    (work / "job.json").write_text(json.dumps(job))
    worker = os.path.join(ROOT, "tests", "multihost_train_worker.py")
    port = free_port()
    children = start({f"worker{i}": python(worker, f"127.0.0.1:{port}", str(i), str(work)) for i in (0, 1)},
                     str(work))
    try:
        reference = _one_device(work, f32_models["cogvlm1"])
    finally:
        results = finish(children, DEADLINE_S)
    for i in (0, 1):
        r = results[f"worker{i}"]
        assert r["rc"] == 0, f"worker {i} rc {r['rc']}:\n{r['stderr'][-4000:]}"
        r.update(json.loads((work / f"done_{i}.json").read_text()))
        assert r["train_rc"] == 0 and "resume_seconds" in r, r["stderr"][-4000:]
        print(f"worker {i}: cogvlm-jax train {r['train_seconds']:.1f} s, then the resumed run {r['resume_seconds']:.1f} s")
    return work, results, reference


def _leaves(state) -> dict:
    """Every leaf of a TrainState by its path (step, parameters, optimizer moments and counts, RNG), as numpy."""
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}


def _checkpoint(run_dir, step, like) -> dict:
    """A checkpoint the two processes wrote, restored here on one device."""
    from cogvlm_jax.training import run as finetune
    from cogvlm_jax.training import trainer as train

    return _leaves(train.restore_state(finetune.checkpoint_dir(str(run_dir), step), like))


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def _max_diff(a: dict, b: dict, keys) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in keys)


def test_two_processes_train_like_one_device(runs):
    """The loss of each step, the gradient of the first (Adam's first moment after it is 0.1 * g) and every
    parameter after each step (from the checkpoints), against the same run on one device."""
    from cogvlm_jax.training import run as finetune
    from cogvlm_jax.training import trainer as train

    work, _, (losses, states, like) = runs
    run = finetune.read_run(str(work / "first"))
    assert run.mesh == (1, 2, 4)  # the default across 2 processes x 4 devices: fsdp over the processes
    assert run.train == train.TrainConfig(**LINEAR_TRAIN)
    log = _log(work / "first")
    assert [e["step"] for e in log] == [1, 2]  # one line per step: only process 0 writes the log
    loss_rel = max(abs(e["loss"] - ref) / ref for e, ref in zip(log, losses))
    print(f"\ntwo processes vs one device: loss rel {loss_rel:.1e} (2 steps)")
    assert loss_rel <= 1e-6
    params = [k for k in states[0] if k.startswith(".trainable")]
    mu = [k for k in states[1] if ".mu[" in k]
    assert len(mu) == len(params)
    for step, bound in ((1, 1e-5), (2, 5e-5)):  # later steps amplify differences
        got = _checkpoint(work / "first", step, like)
        assert got.keys() == states[step].keys()
        rel = _max_diff(got, states[step], params) / _max_diff(states[step], states[0], params)
        print(f"after step {step}: parameters differ by {rel:.1e} of the largest update")
        assert rel <= bound
        if step == 1:
            grad_rel = _max_diff(got, states[1], mu) / max(float(np.abs(states[1][k]).max()) for k in mu)
            print(f"step 1 gradient: {grad_rel:.1e} of its largest element")
            assert grad_rel <= 1e-5


def test_resume_across_processes_is_exact(runs):
    """Two steps straight == step 1, its checkpoint restored by both processes, step 2: the whole state, the
    log and the exported files, bit for bit."""
    work, _, (_, _, like) = runs
    first, resumed = work / "first", work / "resumed"
    straight, again = _checkpoint(first, STEPS, like), _checkpoint(resumed, STEPS, like)
    assert straight.keys() == again.keys() and len(straight) > 40
    for k in straight:
        assert np.array_equal(straight[k], again[k]), k
    assert _log(resumed) == _log(first)
    assert sorted(os.listdir(first / "model")) == sorted(os.listdir(resumed / "model"))
    for name in os.listdir(first / "model"):
        assert (first / "model" / name).read_bytes() == (resumed / "model" / name).read_bytes(), name


def test_export_is_the_trained_parameters(runs):
    """The export (gathered from both processes, written by process 0) holds the last checkpoint's parameters."""
    import cogvlm_jax

    work, _, (_, _, like) = runs
    state = _checkpoint(work / "first", STEPS, like)
    exported = flatten_dict(jax.device_get(cogvlm_jax.load(str(work / "first" / "model"), progress=False).params))
    trained = {k: v for k, v in state.items() if k.startswith(".trainable")}
    assert len(trained) == len(exported)
    for path, value in exported.items():
        key = ".trainable" + "".join(f"['{p}']" for p in path)
        assert np.array_equal(trained[key], value), key


def test_only_process_0_prints_and_nothing_is_left_behind(runs):
    work, results, _ = runs
    for i in (0, 1):  # process 0 refused a new run in a used directory, and both raised it
        assert f"{work / 'first'} already holds a training run" in results[f"worker{i}"].get("refused", ""), i
    assert results["worker0"]["stdout"] == str(work / "first" / "model") + "\n"
    assert results["worker1"]["stdout"] == ""
    for run_dir in ("first", "resumed"):
        assert sorted(os.listdir(work / run_dir)) == ["checkpoints", "log.jsonl", "model", "run.json"]
        assert sorted(os.listdir(work / run_dir / "checkpoints")) == ["step_00000001", "step_00000002"]
