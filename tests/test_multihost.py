"""One model across two processes, for real: a two-process JAX cluster on 127.0.0.1 (4 CPU devices each,
gloo collectives), against one process on one device.

All the processes are started together by one module fixture and each is killed if it outlives its
deadline, so nothing here can hang: a pair running tests/multihost_worker.py (meshes (2,2,2) and (1,4,2)
over both processes, both fixture families, HF and Orbax loads), a pair running ``cogvlm-jax generate``,
and two processes whose peer never comes up.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import FAMILIES, cases, fixture_dir
from processes import ROOT, free_port, python, run_together

from cogvlm_jax.parallel.multihost import EXIT_UNREACHABLE

MESHES = [(2, 2, 2), (1, 4, 2)]
MAX_NEW_TOKENS = 6  # what the `reference` fixture generates
DEADLINE_S = 420  # hard limit for every child, well above what the children need
JOIN_TIMEOUT_S = 8  # --init-timeout of the processes whose peer never comes up
CLI_CASE = ("cogvlm1", "chat_image")


def _cli_args(port: int, process_id: int, timeout: float):
    fam, name = CLI_CASE
    case = next(c for c in cases(fam) if c["name"] == name)
    d = fixture_dir(fam)
    return python("-m", "cogvlm_jax.cli", "generate", "--model", os.path.join(d, "checkpoint"),
                  "--tokenizer", os.path.join(d, "tokenizer"), "--image", os.path.join(d, "images", case["image"]),
                  "--prompt", case["query"], "--max-new-tokens", str(case["max_new_tokens"]), "--mesh", "1,4,2",
                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id),
                  "--init-timeout", str(timeout))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference):
    from cogvlm_jax.convert.convert_hf import convert_hf_to_ours

    import cogvlm_jax

    work = str(tmp_path_factory.mktemp("multihost"))
    families = {}
    for fam in FAMILIES:
        ids, tt, am, pix = reference[fam][0]
        np.savez(os.path.join(work, f"batch_{fam}.npz"), ids=ids, tt=tt, am=am,
                 **({} if pix is None else {"pix": pix}))
        hf = os.path.join(fixture_dir(fam), "checkpoint")
        # Our format, stored in chunks of the (1,4,2) shards (8 devices here) so each process can read its own.
        ours = convert_hf_to_ours(hf, os.path.join(work, f"ours_{fam}"), progress=False,
                                  mesh=cogvlm_jax.make_mesh(*MESHES[-1]))
        families[fam] = {"hf": hf, "ours": ours}
    with open(os.path.join(work, "job.json"), "w") as f:
        json.dump({"meshes": MESHES, "families": families, "max_new_tokens": MAX_NEW_TOKENS}, f)

    worker = os.path.join(ROOT, "tests", "multihost_worker.py")
    p_work, p_cli, p_lone0, p_lone1 = (free_port() for _ in range(4))
    commands = {
        "worker0": python(worker, f"127.0.0.1:{p_work}", "0", work),
        "worker1": python(worker, f"127.0.0.1:{p_work}", "1", work),
        "cli0": _cli_args(p_cli, 0, 60),
        "cli1": _cli_args(p_cli, 1, 60),
        # process 1 of 2, and nobody at the coordinator's address
        "lonely1": _cli_args(p_lone1, 1, JOIN_TIMEOUT_S),
        # process 0 of 2 (it is the coordinator), and its peer never starts
        "lonely0": _cli_args(p_lone0, 0, JOIN_TIMEOUT_S),
    }
    results = run_together(commands, work, DEADLINE_S)
    for r in results.values():
        r["coordinator"] = r["command"][r["command"].index("--coordinator") + 1] if "--coordinator" in r["command"] \
            else None
    for pid in (0, 1):
        path = os.path.join(work, f"out_{pid}.npz")
        results[f"worker{pid}"]["out"] = dict(np.load(path)) if os.path.exists(path) else None
    return results


def _worker_outputs(runs):
    outs = []
    for pid in (0, 1):
        r = runs[f"worker{pid}"]
        assert r["rc"] == 0 and r["out"] is not None, f"worker {pid} rc {r['rc']}:\n{r['stderr'][-4000:]}"
        outs.append(r["out"])
    return outs


@pytest.mark.parametrize("mesh", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_two_processes_give_one_device_numbers(mesh, runs, reference):
    tag = "x".join(map(str, mesh))
    outs = _worker_outputs(runs)
    for fam in FAMILIES:
        _, logits, ids, bound = reference[fam]
        for pid, out in enumerate(outs):
            got = out[f"{fam}/{tag}/logits"]
            assert got.shape == logits.shape
            err = float(np.abs(got - logits).max())
            print(f"\n{fam} mesh {mesh} process {pid}: max |two processes - one device| = {err:.2e} "
                  f"(bound {bound:.2e})")
            assert err <= bound, (fam, mesh, pid, err, bound)
            np.testing.assert_array_equal(out[f"{fam}/{tag}/ids"], ids)
        # every process returns the same full result
        np.testing.assert_array_equal(outs[0][f"{fam}/{tag}/logits"], outs[1][f"{fam}/{tag}/logits"])


def test_each_process_reads_only_its_share(runs):
    outs = _worker_outputs(runs)
    for fam in FAMILIES:
        total = sum(os.path.getsize(os.path.join(fixture_dir(fam), "checkpoint", f))
                    for f in os.listdir(os.path.join(fixture_dir(fam), "checkpoint")) if f.endswith(".safetensors"))
        for pid, out in enumerate(outs):
            for mesh in MESHES:
                tag = "x".join(map(str, mesh))
                read, share, largest = (int(out[f"{fam}/{tag}/{k}"]) for k in ("bytes_read", "share", "largest"))
                print(f"\n{fam} {tag} process {pid}: HF bytes read {read} = share {share} "
                      f"({share / total:.0%} of the files' {total})")
                # At most the share plus one tensor may be read; each region is read exactly once, so it is equal.
                assert read == share <= total
            # (1,4,2): fsdp spans the processes, so each holds (and reads) about half of the model
            assert int(out[f"{fam}/1x4x2/share"]) < 0.6 * total
            io, share = int(out[f"{fam}/ours/io_bytes"]), int(out[f"{fam}/1x4x2/share"])
            largest = int(out[f"{fam}/1x4x2/largest"])
            print(f"{fam} Orbax (chunked by the 1x4x2 shards) process {pid}: read {io} bytes, share {share}, "
                  f"largest tensor {largest}")
            assert io <= share + largest, (fam, pid, io, share, largest)
            assert int(out[f"{fam}/ours/mismatched_shards"]) == 0


def test_cli_generate_on_two_processes_prints_once(runs, f32_models):
    fam, name = CLI_CASE
    case = next(c for c in cases(fam) if c["name"] == name)
    for pid in (0, 1):
        r = runs[f"cli{pid}"]
        assert r["rc"] == 0, f"cli process {pid} rc {r['rc']}:\n{r['stderr'][-4000:]}"
    model = f32_models[fam]
    ids = [int(i) for i in case["arrays"]["generated_ids"]]
    eos = model.config.eos_token_ids
    if any(i in eos for i in ids):
        ids = ids[:min(ids.index(e) for e in eos if e in ids)]
    assert runs["cli0"]["stdout"] == model.tokenizer.decode(ids) + "\n"
    assert runs["cli1"]["stdout"] == ""


@pytest.mark.parametrize("name", ["lonely0", "lonely1"])
def test_process_whose_peer_never_comes_up_fails_naming_the_coordinator(name, runs):
    r = runs[name]
    assert r["rc"] == EXIT_UNREACHABLE, (r["rc"], r["stderr"][-2000:])
    lines = [ln for ln in r["stderr"].splitlines() if "error" in ln]
    assert len(lines) == 1 and f"coordinator {r['coordinator']} " in lines[0], r["stderr"][-2000:]
    assert f"within {JOIN_TIMEOUT_S} s" in lines[0]
    assert "Traceback" not in r["stderr"]
    # the deadline counts from the join; the rest is starting Python and importing jax on a busy machine
    assert r["seconds"] < JOIN_TIMEOUT_S + 60, r["seconds"]



def test_make_mesh_refuses_layouts_that_split_hosts_unevenly():
    from types import SimpleNamespace

    from cogvlm_jax.parallel.axes import make_mesh

    def devices(*per_process):
        return [SimpleNamespace(process_index=p, id=100 * p + i) for p, n in enumerate(per_process) for i in range(n)]

    with pytest.raises(ValueError, match="tensor=4 neither divides nor is a multiple of the 6 devices per process"):
        make_mesh(1, 3, 4, devices=devices(6, 6))
    with pytest.raises(ValueError, match="different numbers of devices"):
        make_mesh(1, 4, 2, devices=devices(5, 3))
