"""Two processes on this machine as two hosts: a real search through
`jax.distributed.initialize` with CPU collectives (gloo), each process with one device
and its own half of every global batch (the 8-device test covers several devices per host).

Checks what multi-host must guarantee: the processes agree on alpha bit for bit (the
search itself also asserts this before writing results), the mesh spans both, and only
process 0 writes metrics and results while both take part in the checkpoints, those taken
by time included; on the loop's toy run, that both set aside a damaged checkpoint
together, also one that only one of them fails to read, and resume from the one before;
and that the step compiled as a loop (`compile='loop'`), its batches split between the
hosts, is the shared step on the whole batches.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import test_loop

from nanas_jax import loop, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST = textwrap.dedent("""
    import json, sys
    from configs import quickstart
    from nanas_jax import experiment

    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = quickstart.get_config()
    cfg.model.channels, cfg.model.layers = 4, 3
    cfg.search.algorithm, cfg.search.epochs, cfg.search.warmup_epochs = "darts", 2, 0
    cfg.data.max_examples, cfg.data.batch_size = 128, 16
    # Validation with the running BatchNorm statistics: recalibration is not what this
    # tests, and it is one more program to compile.
    cfg.search.recalibrate_batches = 0
    # A checkpoint by time after every step: process 0's clock decides for both.
    cfg.checkpoint.every_seconds = 1e-9
    cfg.parallel.distributed = "on"
    cfg.parallel.coordinator_address = "127.0.0.1:" + port
    cfg.parallel.num_processes, cfg.parallel.process_id = 2, process_id
    summary = experiment.run(cfg, workdir)
    import jax
    print("RESULT " + json.dumps({"alpha": summary["alpha"], "devices": summary["devices"],
                                  "processes": summary["processes"],
                                  "local_devices": jax.local_device_count()}))
    """)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(program: str, *args: str) -> list[dict]:
  """Runs ``program`` as processes 0 and 1 of one job (arguments: the process id, the
  coordinator's port, then ``args``); returns each one's last ``RESULT`` line as JSON."""
  port = str(free_port())
  env = {k: v for k, v in os.environ.items()
         if k not in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")}
  env["XLA_FLAGS"] = parallel.fake_cpu_devices_xla_flags(1)
  procs = [subprocess.Popen([sys.executable, "-c", program, str(i), port, *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=900)
      assert proc.returncode == 0, stderr[-3000:]
      line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
      outputs.append(json.loads(line[len("RESULT "):]))
  finally:
    for proc in procs:
      proc.kill()
  return outputs


def test_two_processes_run_a_search_and_agree_on_alpha(tmp_path):
  first, second = run_two_processes(HOST, str(tmp_path))
  assert first["processes"] == second["processes"] == 2
  assert first["devices"] == second["devices"] == 2
  assert first["local_devices"] == second["local_devices"] == 1
  assert first["alpha"] == second["alpha"]
  written = json.loads((tmp_path / "genotype.json").read_text())
  assert written["alpha"] == first["alpha"]
  # One writer: each epoch is logged once, not once per process.
  epochs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"epoch"' in l]
  assert [e["epoch"] for e in epochs] == [1, 2]
  # Both processes saved at every step (a checkpoint only one process joins would hang);
  # the last 3 are kept.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7", "8"]


# The loop's toy run (tests/test_loop.py) on two processes: the first session saves
# checkpoints 2, 3 and 4; checkpoint 4 is then damaged on the storage both read (as on a
# pod's shared bucket), and in the second session process 1 alone also fails to read
# checkpoint 3 half-way through orbax's restore (as with a flaky local disk or cache).
# The processes must agree to set both aside (process 0 moves them, the other waits) and
# resume together from 2.
TOY = textwrap.dedent("""
    import json, logging, os, sys
    sys.path.insert(0, "tests")
    import ml_collections, numpy as np
    import orbax.checkpoint as ocp
    from nanas_jax import parallel
    from test_loop import run

    process_id, port, workdir, epochs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    unreadable = sys.argv[5:]  # checkpoint steps that process 1 alone fails to read
    if process_id == 1 and unreadable:
      read_state = ocp.StandardCheckpointHandler.restore

      def restore(self, directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(directory))) in unreadable:
          raise OSError("simulated read failure on process 1 alone")
        return read_state(self, directory, *args, **kwargs)

      ocp.StandardCheckpointHandler.restore = restore
    parallel.initialize(ml_collections.ConfigDict(dict(
        distributed="on", coordinator_address="127.0.0.1:" + port, num_processes=2,
        process_id=process_id)))
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("absl").addHandler(handler)
    result, _ = run(workdir, epochs=int(epochs), every_steps=1)
    print("RESULT " + json.dumps({"resumed_from": result.resumed_from,
                                  "w": np.asarray(result.state["w"]).tolist(),
                                  "warnings": warnings}))
    """)


def test_two_processes_agree_to_set_aside_a_damaged_checkpoint(tmp_path):
  workdir = tmp_path / "toy"
  first = run_two_processes(TOY, str(workdir), "1")
  assert [out["resumed_from"] for out in first] == [None, None]
  checkpoints = workdir / loop.CHECKPOINT_DIR
  assert sorted(os.listdir(checkpoints)) == ["2", "3", "4"]
  test_loop.damage(str(checkpoints / "4"), "truncated data file")
  second = run_two_processes(TOY, str(workdir), str(test_loop.EPOCHS), "3")
  for out in second:
    assert out["resumed_from"] == 2
    assert len(out["warnings"]) == 2, out["warnings"]
    assert "damaged-4" in out["warnings"][0] and "damaged-3" in out["warnings"][1]
  # Each process names its own reason: process 0 read checkpoint 3 whole.
  assert "on another process" in second[0]["warnings"][1]
  assert "simulated read failure" in second[1]["warnings"][1]
  assert second[0]["w"] == second[1]["w"]
  assert sorted(os.listdir(checkpoints)) == ["10", "11", "12", "damaged-3", "damaged-4"]
  # The global batches are one process's batch twice over: the run equals one process's.
  full, _ = test_loop.run(tmp_path / "one")
  np.testing.assert_allclose(second[0]["w"], np.asarray(full.state["w"]), rtol=1e-6)


# The bilevel test's toy supernet that can skip its kernel's gradient: the step compiled as
# a loop (`compile='loop'`: a scan whose iterations reduce their gradients across the
# hosts, the architecture update and the kernel gradient under `lax.cond`s), each process
# with its half of the global batches, against the shared step on the whole batches in
# one process.
LOOP = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import ml_collections
    from nanas_jax import parallel

    process_id, port = int(sys.argv[1]), sys.argv[2]
    parallel.initialize(ml_collections.ConfigDict(dict(
        distributed="on", coordinator_address="127.0.0.1:" + port, num_processes=2,
        process_id=process_id)))
    # After the initialisation: the bilevel tests' module makes arrays as it loads.
    from test_search_bilevel import loop_against_shared

    mesh = parallel.data_mesh()

    def place(state, batches):  # This process's half of every batch.
      rows = len(batches[0][1]) // 2
      return parallel.replicate(state, mesh), tuple(parallel.shard_batch(
          tuple(x[process_id * rows:(process_id + 1) * rows] for x in b), mesh)
          for b in batches)

    diff, moved, loop = loop_against_shared(place)
    parallel.assert_replicas_agree(loop.alpha, "alpha")
    print("RESULT " + json.dumps({"devices": mesh.devices.size, "diff": diff, "moved": moved,
                                  "alpha": parallel.to_host(loop.alpha).tolist()}))
    """)


def test_two_processes_run_the_loop_step_as_one_process_runs_the_shared_step():
  first, second = run_two_processes(LOOP)
  assert first["devices"] == second["devices"] == 2
  assert first["alpha"] == second["alpha"]
  for out in (first, second):
    assert out["moved"] > 1e-3
    assert out["diff"] < 1e-5
