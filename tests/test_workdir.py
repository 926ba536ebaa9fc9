"""Tests of nanas_jax.workdir: its search supernets, and its cell pictures (a picture of
the same genotype is copied, byte for byte, instead of drawn again; without one, or when
it is missing, the genotype is drawn, and the drawing is what `viz.plot_arch` draws)."""

from nanas_jax import spaces, viz, workdir
from nanas_jax.spaces import get_genotype

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_picture_of_the_same_genotype_is_copied_not_drawn(tmp_path, monkeypatch):
  space, genotype = spaces.get_space("darts"), get_genotype("DARTS_V2")
  earlier = tmp_path / "epoch_001.png"
  earlier.write_bytes(PNG + b"the earlier picture")
  drawn = []
  monkeypatch.setattr(viz, "plot_arch", lambda *args: drawn.append(args))
  workdir.write_cell_picture(space, genotype, str(tmp_path / "epoch_002.png"),
                             same_as=str(earlier))
  assert (tmp_path / "epoch_002.png").read_bytes() == PNG + b"the earlier picture"
  assert not drawn


def test_without_a_picture_to_copy_the_genotype_is_drawn(tmp_path):
  space, genotype = spaces.get_space("darts"), get_genotype("DARTS_V2")
  workdir.write_cell_picture(space, genotype, str(tmp_path / "a.png"))
  workdir.write_cell_picture(space, genotype, str(tmp_path / "b.png"),
                             same_as=str(tmp_path / "missing.png"))
  viz.plot_arch(space, genotype, str(tmp_path / "oracle.png"))
  oracle = (tmp_path / "oracle.png").read_bytes()
  assert oracle.startswith(PNG)
  assert (tmp_path / "a.png").read_bytes() == oracle
  assert (tmp_path / "b.png").read_bytes() == oracle
  assert not (tmp_path / "missing.png").exists()


def test_the_supernet_of_either_space_takes_the_configs_inner_nodes():
  """``model.inner_impl`` reaches both spaces' supernets, and a config written before the
  field existed gets ``'auto'``."""
  from configs import quickstart
  config = quickstart.get_config().model
  for space in ("darts", "nb201"):
    config.space, config.inner_impl = space, "unroll"
    assert workdir.build_supernet(config, 10).inner_impl == "unroll"
  del config.inner_impl
  assert workdir.build_supernet(config, 10).inner_impl == "auto"
