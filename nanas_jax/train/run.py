"""Training a genotype from scratch as a run: data, loop, evaluation and every file written.

`run_train(config, workdir)` is what ``python -m nanas_jax.main`` runs for a config with
``config.task = 'train'``. It drives the pure `nanas_jax.train.trainer.Trainer` through the
loop the searches use (`nanas_jax.loop.run_epochs`: orbax checkpoints, resume, SIGTERM,
NaN stop, metric writers), data parallel over every device of every process
(`nanas_jax.parallel`), and writes into the workdir:

- ``config.json``: the resolved config (`nanas_jax.workdir.record_config`);
- ``genotype.txt`` (the DARTS text of the genotype trained) and ``genotype.png`` (its
  cells), at the start, once the config and the data have passed their checks;
- ``metrics.jsonl``: every logged step and one record per epoch, with the test loss,
  top-1 and top-5 of the epochs that were evaluated;
- ``results.json`` at the end: genotype, parameters and multiply-adds
  (`nanas_jax.summary`'s conventions, counted at the trained input size), final and best
  test top-1 / top-5, epochs, devices, timings.

Config layout: the protocol of `nanas_jax.train.trainer` (``seed``, ``data``, ``model``,
``train``; see `default_train_config`) plus the fields of a run::

  config.task = 'train'
  config.log_every_steps, config.checkpoint {every_steps, every_seconds, keep}   read by
                                the loop
  config.parallel {distributed, coordinator_address, num_processes, process_id}
  config.data {name, batch_size, cutout, train_portion, data_dir, max_examples, augment,
               manual_dir, image_size}                              read by the streams
  config.model.genotype_file    a genotype.txt (e.g. a search's); when set it replaces
                                config.model.genotype
  config.train.eval_every_epochs  evaluate the test split every this many epochs (0: only
                                after the last one, which is always evaluated)

``config.data.batch_size`` is the global batch, summed over every device of every process,
as in the search: the run is the same whatever the number of devices. To keep a per-device
batch when adding devices, scale it (and usually the learning rate) in the config.

The test accuracy reported is the final epoch's. The best evaluated epoch is recorded too,
for information only: choosing an epoch by its test accuracy would select on the test set.

Refusals, before any data is read or anything compiled: a config value training cannot run
with (the message names the field); a workdir holding a finished training
(``results.json``; results are never overwritten); a workdir whose ``genotype.txt`` is a
different genotype from the config's (its checkpoints belong to that one). A workdir with
checkpoints and no ``results.json`` is resumed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from nanas_jax import loop, parallel, spaces, summary
from nanas_jax import workdir as workdir_lib
from nanas_jax.data import loaders
from nanas_jax.data import streams as data_streams
from nanas_jax.files import write_atomic
from nanas_jax.nn import networks
from nanas_jax.spaces.genotypes import get_genotype
from nanas_jax.train import trainer as trainer_lib

RESULTS_FILE = "results.json"
GENOTYPE_FILE = "genotype.txt"


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_run_config(config: ml_collections.ConfigDict) -> None:
  """Checks everything that can be checked before any data is read or anything compiled;
  a ValueError names the field (``config.x.y = v is invalid: expected ...``)."""
  task = config.get("task", "train")
  if task != "train":
    raise ValueError(f"config.task = {task!r} is invalid: expected 'train' for run_train.")
  seed = config.get("seed")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"config.seed = {seed!r} is invalid: expected an integer >= 0.")
  trainer_lib.validate_train_config(config)
  loop.validate_checkpoint_config(config)
  parallel.validate_parallel_config(config.get("parallel"))
  batch = config.data.get("batch_size")
  if not _is_int(batch) or batch < 1:
    raise ValueError(f"config.data.batch_size = {batch!r} is invalid: expected an integer "
                     ">= 1 (the global batch over all devices).")
  data_streams.read_options(config.data)
  every = config.train.get("eval_every_epochs", 1)
  if not _is_int(every) or every < 0:
    raise ValueError(f"config.train.eval_every_epochs = {every!r} is invalid: expected an "
                     "integer >= 0 (0: evaluate only after the last epoch).")
  resolve_genotype(config.model)


def resolve_genotype(model_config: ml_collections.ConfigDict):
  """``(genotype, source)``: the Genotype of ``model.genotype_file`` when set, else of
  ``model.genotype`` (a published name or ``Genotype(...)`` text); ``source`` says which,
  for the results."""
  path = model_config.get("genotype_file")
  if not path:
    return get_genotype(model_config.genotype), "config.model.genotype"
  if not os.path.isfile(path):
    raise ValueError(f"config.model.genotype_file = {path!r} is invalid: expected an "
                     "existing file holding Genotype(...) text (a search's genotype.txt).")
  with open(path) as f:
    text = f.read().strip()
  try:
    return get_genotype(text), f"config.model.genotype_file = {path}"
  except ValueError as error:
    raise ValueError(f"config.model.genotype_file = {path!r} is invalid: {error}") from error


def load_data(config: ml_collections.ConfigDict,
              mesh=None) -> data_streams.TrainStreams:
  """The streams `run_train` trains on, read and checked: the global batch split over the
  devices of ``mesh`` (default: every device), the dataset prepared, each split able to
  fill a batch. The pipeline calls it before its search too, so a ValueError or
  FileNotFoundError says what to fix before anything long has run."""
  parallel.check_batch_size(config.data.batch_size,
                            parallel.data_mesh() if mesh is None else mesh)
  return loaders.load_train_streams(config.data, config.data.batch_size, config.seed)


def _check_workdir(workdir: str, genotype) -> None:
  """Refuses a finished training, and a workdir started with another genotype."""
  results = os.path.join(workdir, RESULTS_FILE)
  if os.path.exists(results):
    raise FileExistsError(
        f"{workdir} already holds a finished training ({RESULTS_FILE}); choose a new "
        "--workdir (results are never overwritten).")
  recorded = os.path.join(workdir, GENOTYPE_FILE)
  if os.path.exists(recorded):
    with open(recorded) as f:
      text = f.read().strip()
    if get_genotype(text) != genotype:
      raise ValueError(
          f"{workdir} holds a training of another genotype ({recorded}: {text}); its "
          "checkpoints would resume that one. Choose a new --workdir, or set "
          f"config.model.genotype_file={recorded}.")


def network_cost(model, image_shape) -> dict[str, int]:
  """Parameters (with and without the auxiliary head) and per-image multiply-adds of
  ``model`` on ``image_shape`` images, counted as `nanas_jax.summary` counts them."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), sample)
  counts = summary.count_mult_adds(model, variables, tuple(image_shape))
  return {
      "params": networks.count_params(variables["params"]),
      "params_with_auxiliary": networks.count_params(variables["params"],
                                                     exclude_auxiliary=False),
      "mult_adds": counts["conv"] + counts["dense"],
      "mult_adds_ptflops": sum(counts.values()),
  }


def _test_metrics(sums: dict[str, float]) -> dict[str, float]:
  count = sums["count"]
  return {"test_loss": sums["loss_sum"] / count, "test_top1": sums["top1_correct"] / count,
          "test_top5": sums["top5_correct"] / count, "test_count": count}


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.model``'s genotype from scratch into ``workdir`` (resuming from its
  checkpoints) and returns the summary written to ``results.json`` plus a ``message``."""
  validate_run_config(config)
  loop.check_workdir(workdir)
  genotype, source = resolve_genotype(config.model)
  _check_workdir(workdir, genotype)
  parallel.initialize(config.get("parallel"))
  mesh = parallel.data_mesh()
  batch = config.data.batch_size
  main = parallel.is_main_process()
  text = str(genotype)

  t0 = time.time()
  streams = load_data(config, mesh)
  # Written once every check has passed, the data's included.
  if main:
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.record_config(config, workdir)
    if not os.path.exists(os.path.join(workdir, GENOTYPE_FILE)):
      write_atomic(os.path.join(workdir, GENOTYPE_FILE), text + "\n", replace=False)
      workdir_lib.write_cell_picture(spaces.get_space("darts"), genotype,
                                    os.path.join(workdir, "genotype.png"))
  model = trainer_lib.build_network(config.model, genotype, streams.num_classes,
                                    streams.image_shape)
  steps_per_epoch = streams.train.steps_per_epoch
  trainer = trainer_lib.Trainer(model, config, steps_per_epoch)
  state = trainer.init(jax.random.key(config.seed), jnp.zeros((1, *streams.image_shape)))
  state = parallel.replicate(state, mesh)
  init_seconds = time.time() - t0
  eval_fn = jax.jit(trainer.eval_step)
  epochs = config.train.epochs
  every = config.train.get("eval_every_epochs", 1)
  logging.info("Training %s from scratch: %s network, %d cells, C=%d, %d epochs x %d "
               "steps, global batch %d over %d devices, %s.", text, config.model.network,
               config.model.layers, config.model.channels, epochs, steps_per_epoch, batch,
               mesh.devices.size, streams.name)
  # Wall time summed over the sessions of a resumed run, each counted to its last epoch
  # end (the time after a session's last checkpoint is lost with it).
  clock: dict[str, float] = {}

  def end_of_epoch(state, epoch, means, extra):
    clock.setdefault("before", extra.get("train_seconds", 0.0))
    record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, **means}
    line = (f"epoch {epoch + 1}/{epochs}  train loss {means['mean_loss']:.4f} "
            f"top-1 {means['mean_top1']:.3f}  lr {means['mean_lr']:.4g}  drop path "
            f"{means['mean_drop_path_prob']:.3f}")
    if epoch + 1 == epochs or (every and (epoch + 1) % every == 0):
      test = _test_metrics(loop.evaluate(eval_fn, state, streams.test, mesh))
      record.update(test)
      extra.setdefault("evaluations", []).append({"epoch": epoch + 1, **test})
      if "best_test_top1" not in extra or test["test_top1"] > extra["best_test_top1"]:
        extra.update(best_test_top1=test["test_top1"], best_test_top5=test["test_top5"],
                     best_epoch=epoch + 1)
      line += (f"  test loss {test['test_loss']:.4f} top-1 {test['test_top1']:.4f} "
               f"top-5 {test['test_top5']:.4f}")
    extra["train_seconds"] = clock["before"] + time.time() - t0
    logging.info(line)
    return record

  result = loop.run_epochs(
      workdir=workdir, config=config, mesh=mesh, state=state,
      step_fn=trainer.jit_train_step(), batches_fn=streams.train.batches,
      steps_per_epoch=steps_per_epoch, epochs=epochs, end_of_epoch=end_of_epoch,
      finite_keys=("loss",),
      hint="Lower config.train.optim.lr (or config.train.optim.grad_clip) and rerun: the "
           "run resumes from that checkpoint.",
      memory_hint=loop.memory_hint((), batch, mesh.devices.size))
  parallel.assert_replicas_agree(result.state.params, "the trained weights")
  extra = result.extra
  final = extra["evaluations"][-1]
  summary_ = {
      "genotype": text, "genotype_source": source, "dataset": streams.name,
      "num_classes": streams.num_classes, "image_shape": list(streams.image_shape),
      "network": config.model.network, "layers": config.model.layers,
      "channels": config.model.channels, "auxiliary": config.model.auxiliary,
      **network_cost(model, streams.image_shape),
      "epochs": epochs, "steps_per_epoch": steps_per_epoch, "global_batch_size": batch,
      "train_examples": streams.train.num_examples,
      "test_examples": streams.test.num_examples,
      "test_loss": final["test_loss"], "test_top1": final["test_top1"],
      "test_top5": final["test_top5"], "best_epoch": extra["best_epoch"],
      "best_test_top1": extra["best_test_top1"], "best_test_top5": extra["best_test_top5"],
      "evaluations": extra["evaluations"], "devices": int(mesh.devices.size),
      "processes": jax.process_count(), "resumed_from_step": result.resumed_from,
      "init_seconds": init_seconds, "first_step_seconds": result.first_step_seconds,
      "train_seconds": extra["train_seconds"], "total_seconds": time.time() - t0,
  }
  if main:
    write_atomic(os.path.join(workdir, RESULTS_FILE), json.dumps(summary_, indent=2) + "\n",
                 replace=False)
  summary_["genotype_path"] = os.path.join(workdir, GENOTYPE_FILE)
  summary_["message"] = (
      f"Training finished: test top-1 {final['test_top1']:.4f}, top-5 "
      f"{final['test_top5']:.4f} after {epochs} epochs ({summary_['params']:,} parameters; "
      f"results in {os.path.join(workdir, RESULTS_FILE)}).")
  logging.info(summary_["message"])
  return summary_
