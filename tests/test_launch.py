"""Tests of launch/: the Colab TPU notebook, the TPU pod script and the SLURM GPU script.

The notebook test (``test_notebook_*``; deselect with ``-k "not notebook"``) executes the
notebook top to bottom in a Jupyter kernel on this machine, a real quick-start search at
its smallest size. The scripts run against stand-ins for gcloud, srun, squeue and scontrol
placed first on PATH, which record what they were asked to do.
"""

import json
import os
import shlex
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from nanas_jax.spaces.darts import Genotype

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
NOTEBOOK = os.path.join(LAUNCH, "colab_tpu.ipynb")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")

# The quick start at its smallest size: 256 digits give 4 steps of one epoch.
NOTEBOOK_OVERRIDES = {"search.epochs": 1, "search.warmup_epochs": 0,
                      "data.max_examples": 256, "model.layers": 3, "model.channels": 4,
                      "search.neighbors.num": 2}


def _cell(notebook, cell_id):
  return next(cell for cell in notebook.cells if cell.get("id") == cell_id)


def _stdout(cell):
  return "".join(out.get("text", "") for out in cell.outputs
                 if out.output_type == "stream" and out.name == "stdout")


def _kernel_sees_this_checkout(monkeypatch):
  """Makes the kernel import this checkout's nanas_jax, as the notebook's install would, even
  in an environment where the package is not installed (the install cell then skips)."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_colab_file_is_committed_without_outputs_and_with_a_papermill_parameters_cell():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1
  names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
           if "=" in line and not line.startswith("#")}
  assert names == {"REPO", "REPO_DIR", "CONFIG", "OVERRIDES", "WORKDIR"}
  assert notebook.metadata["accelerator"] == "TPU"


def test_notebook_runs_a_search_in_process_and_shows_its_genotype(tmp_path, monkeypatch):
  _kernel_sees_this_checkout(monkeypatch)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "run"
  # As papermill does: a cell after the parameters cell overrides its values.
  position = next(i for i, cell in enumerate(notebook.cells)
                  if "parameters" in cell.metadata.get("tags", []))
  injected = nbformat.v4.new_code_cell(
      f"OVERRIDES = {NOTEBOOK_OVERRIDES!r}\nWORKDIR = {str(workdir)!r}",
      metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(position + 1, injected)
  # The kernel starts outside the repository, so CONFIG must resolve through the package.
  client = NotebookClient(notebook, timeout=900, startup_timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  assert f"nanas_jax from {REPO}" in _stdout(_cell(notebook, "install"))
  assert "backend cpu" in _stdout(_cell(notebook, "devices"))
  config = json.loads((workdir / "config.json").read_text())
  assert config["search"]["epochs"] == 1 and config["model"]["channels"] == 4
  assert config["data"]["max_examples"] == 256

  text = (workdir / "genotype.txt").read_text().strip()
  assert str(Genotype.parse(text)) == text
  assert _stdout(_cell(notebook, "genotype")).strip() == text
  assert "Search finished" in _stdout(_cell(notebook, "run"))

  picture = _cell(notebook, "picture")
  if (workdir / "genotype.png").exists():
    assert any("image/png" in out.get("data", {}) for out in picture.outputs)
  else:
    assert "No cell picture" in _stdout(picture)
  curve = _cell(notebook, "curve")
  assert any("image/png" in out.get("data", {}) for out in curve.outputs)


def test_colab_config_cell_rejects_an_override_of_a_field_that_does_not_exist(
    tmp_path, monkeypatch):
  _kernel_sees_this_checkout(monkeypatch)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Up to the config cell: the misspelt field must fail before any search starts.
  last = next(i for i, cell in enumerate(notebook.cells) if cell.get("id") == "config")
  notebook.cells = notebook.cells[:last + 1]
  notebook.cells.insert(last, nbformat.v4.new_code_cell("OVERRIDES = {'search.epoch': 1}"))
  client = NotebookClient(notebook, timeout=300, startup_timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  with pytest.raises(Exception, match='Key "epoch" does not exist'):
    client.execute()


@pytest.mark.parametrize("script", [TPU_POD, SLURM])
def test_scripts_parse(script):
  out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def _fake_commands(tmp_path, names):
  """Puts a recording stand-in for each command in ``names`` first on PATH.

  Each call appends ``[name, argv, selected env]`` to calls.jsonl; ``gcloud ... describe``
  fails (no such TPU), ``squeue`` prints $FAKE_TIME_LEFT, ``srun`` writes genotype.txt
  into its --workdir when $FAKE_FINISH is set and exits with $FAKE_STATUS.
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  for name in names:
    path = bin_dir / name
    path.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
env = {{k: os.environ.get(k) for k in ("JAX_LOCAL_DEVICE_IDS", "SRUN_CPUS_PER_TASK")}}
with open({str(log)!r}, "a") as f:
  f.write(json.dumps([{name!r}, args, env]) + "\\n")
if {name!r} == "gcloud" and "describe" in args:
  sys.exit(1)
if {name!r} == "squeue":
  print(os.environ["FAKE_TIME_LEFT"])
if {name!r} == "srun":
  if os.environ.get("FAKE_FINISH"):
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    open(os.path.join(workdir, "genotype.txt"), "w").write("done")
  sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
""")
    path.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  return env, log


def _calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


POD_ENV = {"TPU_NAME": "test-pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32",
           "CONFIG": "configs/na_darts_cifar10.py:second", "WORKDIR": "/mnt/gcs/run 1",
           "EXTRA": "--config.data.data_dir=gs://bucket/tfds", "REF": "v1"}


def test_tpu_pod_dry_run_prints_the_gcloud_commands_and_runs_none(tmp_path):
  env, log = _fake_commands(tmp_path, ["gcloud"])
  out = subprocess.run(["bash", TPU_POD, "--dry-run"], env={**env, **POD_ENV},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert _calls(log) == []
  create, setup, run = [shlex.split(line) for line in out.stdout.splitlines()]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "test-pod"]
  assert "--accelerator-type=v4-32" in create
  for ssh in (setup, run):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "test-pod"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  setup_command = setup[-1].removeprefix("--command=")
  assert "jax[tpu]" in setup_command and "--branch v1" in setup_command
  # The remote command is itself a shell line: it must split into the search's arguments.
  remote = shlex.split(run[-1].removeprefix("--command="))
  assert remote[remote.index("-m") + 1:] == [
      "nanas_jax.main", "--config=configs/na_darts_cifar10.py:second",
      "--workdir=/mnt/gcs/run 1", "--config.parallel.distributed=on",
      "--config.data.data_dir=gs://bucket/tfds"]


def test_tpu_pod_runs_exactly_the_commands_that_dry_run_prints(tmp_path):
  env, log = _fake_commands(tmp_path, ["gcloud"])
  env.update(POD_ENV)
  dry = subprocess.run(["bash", TPU_POD, "--dry-run", "create", "setup", "run", "delete"],
                       env=env, capture_output=True, text=True, timeout=60)
  real = subprocess.run(["bash", TPU_POD, "create", "setup", "run", "delete"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert dry.returncode == 0 and real.returncode == 0, real.stderr
  ran = [["gcloud", *args] for _, args, _ in _calls(log)]
  # The real run first asks whether the slice exists (the stand-in says no).
  assert ran[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
  assert ran[1:] == [shlex.split(line) for line in dry.stdout.splitlines()]


def test_tpu_pod_detached_run_survives_the_ssh_session(tmp_path):
  env, log = _fake_commands(tmp_path, ["gcloud"])
  out = subprocess.run(["bash", TPU_POD, "--detach", "run"], env={**env, **POD_ENV},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  [(_, args, _)] = _calls(log)
  remote = shlex.split(args[-1].removeprefix("--command="))
  assert remote[:3] == ["nohup", "bash", "-c"] and remote[-1] == "&"
  assert "--config.parallel.distributed=on" in remote[3]
  assert "tail -f ~/nanas_run.log" in out.stdout


@pytest.mark.parametrize("args", [["run"], ["--bogus"]])
def test_tpu_pod_refuses_bad_input_before_any_gcloud_command(tmp_path, args):
  env, log = _fake_commands(tmp_path, ["gcloud"])
  env.pop("WORKDIR", None)
  out = subprocess.run(["bash", TPU_POD, *args], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2
  assert "Usage:" in out.stderr
  assert _calls(log) == []


def test_slurm_script_asks_for_one_task_per_node_and_a_warning_signal():
  directives = [line.split(None, 1)[1] for line in open(SLURM).read().splitlines()
                if line.startswith("#SBATCH ")]
  for directive in ("--ntasks-per-node=1", "--signal=TERM@120", "--requeue"):
    assert directive in directives
  assert any(d.startswith("--gpus-per-node=") for d in directives)
  assert any(d.startswith("--cpus-per-task=") for d in directives)
  assert any(d.startswith("--time=") for d in directives)
  srun = [line for line in open(SLURM).read().splitlines() if line.startswith("srun ")]
  assert len(srun) == 1 and "nanas_jax.main" in srun[0]
  assert "--config.parallel.distributed=on" in open(SLURM).read()


def _run_slurm(tmp_path, time_left, status, finish=False, restarts=0):
  env, log = _fake_commands(tmp_path, ["srun", "squeue", "scontrol"])
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text("")
  workdir = tmp_path / "work"
  workdir.mkdir()
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  env.update({"SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16",
              "SLURM_RESTART_COUNT": str(restarts), "REPO_DIR": str(tmp_path),
              "VENV": str(tmp_path / "venv"), "FAKE_TIME_LEFT": time_left,
              "FAKE_STATUS": str(status), "FAKE_FINISH": "1" if finish else ""})
  out = subprocess.run(["bash", SLURM, "configs/na_darts_cifar10.py:second", str(workdir),
                        "--config.data.data_dir=/shared/tfds"], env=env,
                       capture_output=True, text=True, timeout=60)
  return out, _calls(log), workdir


def test_slurm_script_starts_one_search_per_node_with_all_its_gpus(tmp_path):
  out, calls, workdir = _run_slurm(tmp_path, "10:00:00", 0, finish=True)
  assert out.returncode == 0, out.stderr
  [(name, args, env)] = [call for call in calls if call[0] == "srun"]
  assert args == ["--kill-on-bad-exit=1", "python", "-m", "nanas_jax.main",
                  "--config=configs/na_darts_cifar10.py:second", f"--workdir={workdir}",
                  "--config.parallel.distributed=on", "--config.data.data_dir=/shared/tfds"]
  assert env == {"JAX_LOCAL_DEVICE_IDS": "0,1,2,3", "SRUN_CPUS_PER_TASK": "16"}
  assert not [call for call in calls if call[0] == "scontrol"]


@pytest.mark.parametrize("time_left,status,restarts,requeued,exit_code", [
    ("1:30", 143, 0, True, 0),        # stopped by the time-limit SIGTERM: requeue
    ("02:10", 143, 5, True, 0),
    ("1:30", 143, 20, False, 143),    # out of requeues
    ("1-02:03:04", 1, 0, False, 1),   # a failure with time to spare is an error
    ("UNLIMITED", 1, 0, False, 1),
])
def test_slurm_script_requeues_a_search_stopped_by_the_time_limit(
    tmp_path, time_left, status, restarts, requeued, exit_code):
  out, calls, _ = _run_slurm(tmp_path, time_left, status, restarts=restarts)
  assert out.returncode == exit_code, out.stderr
  requeues = [args for name, args, _ in calls if name == "scontrol"]
  assert requeues == ([["requeue", "42"]] if requeued else [])


def test_slurm_script_does_not_requeue_a_finished_search(tmp_path):
  out, calls, _ = _run_slurm(tmp_path, "0:45", 0, finish=True)
  assert out.returncode == 0, out.stderr
  assert not [call for call in calls if call[0] in ("scontrol", "squeue")]
