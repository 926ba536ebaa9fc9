"""Test support: the values a TensorBoard event directory holds, read by TensorBoard's
own loader (an independent reader of what `nanas_jax.loop` writes and trims)."""

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def tensorboard_values(logdir, tag):
  """``(step, value)`` of ``tag`` in the event files of ``logdir``, in the order
  TensorBoard's loader reads them (orphaned-data purging off: what the files hold)."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE,
      purge_orphaned_data=False)
  accumulator.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in accumulator.Tensors(tag)]
