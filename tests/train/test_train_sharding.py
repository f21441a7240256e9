"""One config on 1 or N devices: the same losses, checkpoints that move between meshes, the
Pallas kernel per device, and clear errors for meshes and batches that do not fit.

The multi-device runs happen once, in a subprocess with 8 simulated CPU devices
(tests/sharded_runs.py), and in two processes of 2 devices each joined by
jax.distributed.initialize (tests/two_process_run.py); the rule and error checks run here on
abstract meshes."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from nsa_jax.train import resolve
from nsa_jax.train.sharding import MIN_SHARDED_SIZE, MeshSettings, check_batch_size, fsdp_spec
from tests.helpers.runs import REPO, losses, tiny_run_config

RTOL = 1e-5  # float32 sums in another order, six optimizer steps on


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "sharded_runs.py"), str(root)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def as_array(losses: dict, steps) -> np.ndarray:
    """Losses at `steps` from a step -> loss dict (keys int, or str after a JSON round trip)."""
    by_step = {int(step): loss for step, loss in losses.items()}
    return np.array([by_step[s] for s in steps])


def test_eight_devices_follow_the_one_device_loss_trajectory(runs):
    assert sorted(runs["one"]) == sorted(runs["eight"]) == [str(s) for s in range(1, 7)]
    np.testing.assert_allclose(as_array(runs["eight"], range(1, 7)),
                               as_array(runs["one"], range(1, 7)), rtol=RTOL)
    assert runs["eight"]["6"] < runs["eight"]["1"] - 0.3


def test_context_parallel_run_follows_the_one_device_loss_trajectory(runs):
    """data=2 x fsdp=2 x context=2: nsa_attention splits every sequence over 2 devices."""
    assert runs["context_split"]
    np.testing.assert_allclose(as_array(runs["context"], range(1, 7)),
                               as_array(runs["one"], range(1, 7)), rtol=RTOL)


@pytest.mark.parametrize("run, devices, embedding_spec", [
    ("eight_on_one", 1, "P()"), ("eight_on_four", 4, "P(None, 'fsdp')")])
def test_checkpoint_written_on_eight_devices_resumes_on_fewer(runs, run, devices, embedding_spec):
    resumed = runs[run]
    assert resumed["resumed_at"] == 3
    assert resumed["devices"] == [devices]  # every restored array lives on the new mesh
    assert resumed["embedding_spec"] == embedding_spec  # 259 x 32: only 32 splits 4 ways
    np.testing.assert_allclose(as_array(resumed["losses"], range(1, 7)),
                               as_array(runs["eight"], range(1, 7)), rtol=RTOL)


def test_two_processes_load_their_own_rows_and_train_alike(runs, tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2"}
    processes = [subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "train" / "two_process_run.py"), str(tmp_path / "run")],
        env={**env, "JAX_PROCESS_ID": str(i)}, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, out[-2000:] + err[-3000:]
    assert "process 0 of 2, 4 devices" in outputs[0][0] and "step 6/6" in outputs[0][0]
    assert "process 1 of 2, 4 devices" in outputs[1][0] and "loss" not in outputs[1][0]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4, 5, 6, 6]  # one writer
    np.testing.assert_allclose(as_array(losses(tmp_path / "run"), range(1, 7)),
                               as_array(runs["one"], range(1, 7)), rtol=RTOL)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "6"]


def test_pallas_kernel_runs_per_device_under_a_mesh(runs):
    assert runs["pallas"]["shard_map"]
    assert runs["pallas"]["max_rel_error"] <= 1e-5


def test_batch_the_mesh_cannot_split_is_a_clear_error(runs):
    message = runs["bad_batch_error"]
    for part in ("data.batch_size (12)", "8 devices", "data=2 x fsdp=4", "multiple of 8"):
        assert part in message
    with pytest.raises(ValueError, match=r"batch_size \(6\).*4 devices of mesh data=1 x fsdp=4"):
        check_batch_size(6, AbstractMesh((1, 4), ("data", "fsdp")))
    check_batch_size(8, AbstractMesh((1, 4), ("data", "fsdp")))


@pytest.mark.parametrize("mesh, devices, sizes", [
    ((1, -1), 8, (1, 8, 1)), ((-1, 2), 8, (4, 2, 1)), ((2, 2), 8, (2, 2, 1)),
    ((1, -1), 1, (1, 1, 1)), ((1, -1, 2), 8, (1, 4, 2)), ((-1, 1, 4), 8, (2, 1, 4))])
def test_minus_one_fills_the_remaining_devices(mesh, devices, sizes):
    assert MeshSettings(*mesh).sizes(devices) == sizes


@pytest.mark.parametrize("changes, message", [
    ({"mesh.data": 0}, "mesh.data must be an int >= 1"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "cannot both be -1"),
    ({"mesh.context": -1}, "mesh.context must be an int >= 1"),
])
def test_bad_mesh_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        resolve(tiny_run_config(**changes))


def test_unknown_mesh_key_and_non_bool_distributed_are_clear_errors():
    config = tiny_run_config().to_dict()
    config["mesh"]["devices"] = 8
    with pytest.raises(ValueError, match=r"\['devices'\] in config section 'mesh'.*'fsdp'"):
        resolve(config)
    with pytest.raises(ValueError, match="mesh.distributed must be True or False"):
        MeshSettings(distributed="yes")


@pytest.mark.parametrize("mesh, devices", [((3, -1, 1), 8), ((4, 4, 1), 8), ((1, -1, 3), 8)])
def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(mesh, devices):
    with pytest.raises(ValueError, match=rf"mesh data={mesh[0]} x fsdp={mesh[1]} x "
                                         rf"context={mesh[2]} does not fit"):
        MeshSettings(*mesh).sizes(devices)


@pytest.mark.parametrize("shape, fsdp, spec", [
    ((259, 512), 4, P(None, "fsdp")),          # vocab rows indivisible: split the width
    ((512, 1536), 4, P(None, "fsdp")),         # the largest divisible dimension
    ((1536, 512), 4, P("fsdp", None)),
    ((256, 256), 4, P("fsdp", None)),          # equal dimensions: the first
    ((4, 512, 64), 8, P(None, "fsdp", None)),
    ((259, 131), 4, P()),                      # nothing divisible: replicated
    ((512,), 4, P()),                          # below MIN_SHARDED_SIZE: replicated
    ((MIN_SHARDED_SIZE,), 4, P("fsdp")),
    ((), 4, P()),
    ((512, 1536), 1, P()),
])
def test_fsdp_rule(shape, fsdp, spec):
    assert fsdp_spec(shape, fsdp) == spec
