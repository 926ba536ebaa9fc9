"""Tests of nanas_jax.viz: cell graphs against the architectures written out by hand, the
drawn figures' text and arrows against the graphs, and the atomic PNG / SVG writing."""

import collections
import itertools
import os
import re
import stat
import types

import matplotlib.image
import pytest
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanas_jax import viz
from nanas_jax.spaces import GENOTYPES, NB201Arch, get_genotype, get_space

NB201_TEXT = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|'
              '+|none~0|nor_conv_1x1~1|skip_connect~2|')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
STATE_NAMES = ('c_{k-2}', 'c_{k-1}', '0', '1', '2', '3', '4')


def test_darts_v2_normal_cell_graph_by_hand():
  # DARTS_V2 normal (quark0/darts genotypes.py), read off node by node.
  graph = viz.cell_graph(get_genotype('DARTS_V2'), 'normal')
  assert graph.nodes == ('c_{k-2}', 'c_{k-1}', '0', '1', '2', '3', 'c_{k}')
  assert graph.inputs == ('c_{k-2}', 'c_{k-1}') and graph.output == 'c_{k}'
  assert graph.edges == (
      ('c_{k-2}', '0', 'sep_conv_3x3'), ('c_{k-1}', '0', 'sep_conv_3x3'),
      ('c_{k-2}', '1', 'sep_conv_3x3'), ('c_{k-1}', '1', 'sep_conv_3x3'),
      ('c_{k-1}', '2', 'sep_conv_3x3'), ('c_{k-2}', '2', 'skip_connect'),
      ('c_{k-2}', '3', 'skip_connect'), ('0', '3', 'dil_conv_3x3'),
      ('0', 'c_{k}', None), ('1', 'c_{k}', None), ('2', 'c_{k}', None),
      ('3', 'c_{k}', None))
  assert viz.layer_of(graph) == {'c_{k-2}': 0, 'c_{k-1}': 0, '0': 1, '1': 1, '2': 1,
                                 '3': 2, 'c_{k}': 3}


@pytest.mark.parametrize('name', sorted(GENOTYPES))
@pytest.mark.parametrize('cell', ['normal', 'reduce'])
def test_every_pair_becomes_an_edge_into_its_node(name, cell):
  genotype = GENOTYPES[name]
  graph = viz.cell_graph(genotype, cell)
  pairs = getattr(genotype, cell)
  concat = getattr(genotype, f'{cell}_concat')
  op_edges = [e for e in graph.edges if e[2] is not None]
  # Pair i belongs to node i // 2, i.e. state i // 2 + 2.
  assert op_edges == [(STATE_NAMES[source], str(i // 2), op)
                      for i, (op, source) in enumerate(pairs)]
  assert [e for e in graph.edges if e[2] is None] == [
      (STATE_NAMES[state], 'c_{k}', None) for state in concat]
  layers = viz.layer_of(graph)
  assert all(layers[source] < layers[target] for source, target, _ in graph.edges)


def test_nb201_graph_by_hand():
  graph = viz.nb201_graph(NB201Arch.parse(NB201_TEXT))
  assert graph.nodes == ('0', '1', '2', '3')
  assert graph.inputs == ('0',) and graph.output == '3'
  assert graph.edges == (
      ('0', '1', 'nor_conv_3x3'), ('0', '2', 'nor_conv_3x3'), ('1', '2', 'avg_pool_3x3'),
      ('0', '3', 'none'), ('1', '3', 'nor_conv_1x1'), ('2', '3', 'skip_connect'))
  assert viz.layer_of(graph) == {'0': 0, '1': 1, '2': 2, '3': 3}


def test_layout_puts_layers_in_columns_and_keeps_nodes_apart():
  graph = viz.cell_graph(get_genotype('PC_DARTS'), 'reduce')
  positions = viz.layout(graph)
  layers = viz.layer_of(graph)
  columns = [{positions[n][0] for n in graph.nodes if layers[n] == layer}
             for layer in range(max(layers.values()) + 1)]
  assert all(len(column) == 1 for column in columns)
  xs = [column.pop() for column in columns]
  assert xs == sorted(set(xs))
  assert len(set(positions.values())) == len(graph.nodes)


def _texts(ax):
  return collections.Counter(t.get_text() for t in ax.texts)


def test_figure_labels_every_op_edge_and_draws_every_edge():
  genotype = get_genotype('DARTS_V2')
  fig = viz.genotype_figure(genotype)
  assert [ax.get_title() for ax in fig.axes] == ['normal cell', 'reduction cell']
  for ax, cell in zip(fig.axes, ('normal', 'reduce')):
    ops = collections.Counter(op for op, _ in getattr(genotype, cell))
    node_labels = collections.Counter(
        ['$c_{k-2}$', '$c_{k-1}$', '0', '1', '2', '3', '$c_{k}$'])
    assert _texts(ax) == ops + node_labels
    arrows = [p for p in ax.patches if isinstance(p, patches.FancyArrowPatch)]
    assert len(arrows) == 8 + 4  # Two inputs per node, four concatenated nodes.


def test_draw_cell_draws_on_the_callers_axes_what_the_figure_draws():
  # A caller's own figure (here two cells side by side, the second an NB201 cell): each
  # axes gets the same text and arrows as the library's own figure of that cell.
  genotype = get_genotype('PC_DARTS')
  fig = Figure()
  left, right = fig.subplots(1, 2)
  viz.draw_cell(left, viz.cell_graph(genotype, 'reduce'), title='mine')
  viz.draw_cell(right, viz.nb201_graph(NB201Arch.parse(NB201_TEXT)))
  reference = viz.genotype_figure(genotype).axes[1]
  (nb201_reference,) = viz.nb201_figure(NB201_TEXT).axes
  for ax, ref in ((left, reference), (right, nb201_reference)):
    assert _texts(ax) == _texts(ref)
    assert ([(a.get_linestyle(), a.get_connectionstyle().rad) for a in ax.patches
             if isinstance(a, patches.FancyArrowPatch)]
            == [(a.get_linestyle(), a.get_connectionstyle().rad) for a in ref.patches
                if isinstance(a, patches.FancyArrowPatch)])
  assert left.get_title() == 'mine' and right.get_title() == ''


def test_nb201_figure_dashes_exactly_the_none_edges():
  fig = viz.nb201_figure(NB201_TEXT)
  (ax,) = fig.axes
  assert _texts(ax) == collections.Counter(
      ['nor_conv_3x3', 'nor_conv_3x3', 'avg_pool_3x3', 'none', 'nor_conv_1x1',
       'skip_connect', '0', '1', '2', '3'])
  arrows = [p for p in ax.patches if isinstance(p, patches.FancyArrowPatch)]
  assert len(arrows) == 6
  assert sum(a.get_linestyle() == '--' for a in arrows) == 1


@pytest.mark.parametrize('cell', ['normal', 'reduce'])
def test_arrows_end_where_clipping_by_the_node_boxes_ends_them(cell):
  """Each arrow ends where matplotlib's own clipping by the node patches (``patchA``,
  ``patchB``, which `viz` no longer uses: it took 2/3 of a picture's time) ends the same
  curve, to within a point, its head included."""
  graph = viz.cell_graph(get_genotype('DARTS_V2'), cell)
  fig = viz.genotype_figure('DARTS_V2')
  ax = fig.axes[0 if cell == 'normal' else 1]
  arrows = [p for p in ax.patches if isinstance(p, patches.FancyArrowPatch)]
  plan = viz._plan(graph)
  box_of = lambda node: next(
      b for b in ax.patches if isinstance(b, patches.FancyBboxPatch)
      and abs(b.get_x() + b.get_width() / 2 - plan.positions[node][0]) < 1e-9
      and abs(b.get_y() + b.get_height() / 2 - plan.positions[node][1]) < 1e-9)
  assert len(arrows) == len(graph.edges)
  oracles = [ax.add_patch(patches.FancyArrowPatch(
      plan.positions[source], plan.positions[target], connectionstyle=f'arc3,rad={rad}',
      arrowstyle='-|>', mutation_scale=10, patchA=box_of(source), patchB=box_of(target)))
             for (source, target, _), rad in zip(graph.edges, plan.rads)]
  FigureCanvasAgg(fig).draw()  # a drawing sets the arrows' points-to-pixels scale
  pixels_per_point = fig.dpi / 72
  for arrow, oracle, edge in zip(arrows, oracles, graph.edges):
    got, want = arrow._get_path_in_displaycoord()[0], oracle._get_path_in_displaycoord()[0]
    assert len(got) == len(want) == 2  # the line and the head
    for g, w in zip(got, want):
      assert g.vertices.shape == w.vertices.shape
      assert abs(g.vertices - w.vertices).max() < pixels_per_point, edge


@pytest.mark.parametrize('name', sorted(GENOTYPES))
def test_rendered_op_labels_do_not_overlap(name):
  fig = viz.genotype_figure(GENOTYPES[name])
  FigureCanvasAgg(fig)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  for ax, cell in zip(fig.axes, ('normal', 'reduce')):
    # Op labels are the texts drawn on a box.
    boxes = [t.get_bbox_patch().get_window_extent(renderer)
             for t in ax.texts if t.get_bbox_patch() is not None]
    assert len(boxes) == len(getattr(GENOTYPES[name], cell))
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_png_file(tmp_path):
  path = tmp_path / 'darts_v2.png'
  assert viz.plot_genotype('DARTS_V2', path) == str(path)
  data = path.read_bytes()
  assert data.startswith(PNG_SIGNATURE)
  assert len(data) > 20_000
  image = matplotlib.image.imread(path)
  height, width = image.shape[:2]
  assert width > 2 * height > 400  # Two panels side by side.
  assert image[..., :3].std() > 0.05  # Not a blank canvas.
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  assert os.listdir(tmp_path) == ['darts_v2.png']


def test_svg_keeps_op_names_as_text(tmp_path):
  genotype = get_genotype('PC_DARTS')
  path = tmp_path / 'pc_darts.SVG'
  viz.plot_genotype(genotype, path)
  texts = collections.Counter(re.findall(r'<text[^>]*>([^<]*)</text>', path.read_text()))
  ops = collections.Counter(op for op, _ in genotype.normal + genotype.reduce)
  assert all(texts[op] == count for op, count in ops.items())


def test_plot_arch_dispatches_on_the_space(tmp_path):
  viz.plot_arch(get_space('nb201'), NB201_TEXT, tmp_path / 'nb201.svg')
  assert 'nor_conv_1x1' in (tmp_path / 'nb201.svg').read_text()
  viz.plot_arch('darts', get_genotype('DARTS_V1'), tmp_path / 'v1.png')
  assert (tmp_path / 'v1.png').read_bytes().startswith(PNG_SIGNATURE)
  toy = types.SimpleNamespace(name='toy', parse=lambda text: text)
  with pytest.raises(ValueError, match="no cell picture for search space 'toy'"):
    viz.plot_arch(toy, 'arch', tmp_path / 'toy.png')
  assert sorted(os.listdir(tmp_path)) == ['nb201.svg', 'v1.png']


def test_bad_extension_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ValueError, match=r'end the path in \.png or \.svg'):
    viz.plot_genotype('DARTS_V2', tmp_path / 'cell.jpg')
  with pytest.raises(ValueError, match='end the path in'):
    viz.plot_nb201(NB201_TEXT, tmp_path / 'cell')
  assert os.listdir(tmp_path) == []


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist; create it first'):
    viz.plot_genotype('DARTS_V2', tmp_path / 'missing' / 'cell.png')


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
  path = tmp_path / 'cell.png'
  path.write_bytes(b'old picture')

  def broken_savefig(self, *args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(Figure, 'savefig', broken_savefig)
  with pytest.raises(RuntimeError, match='disk full'):
    viz.plot_genotype('DARTS_V2', path)
  assert os.listdir(tmp_path) == ['cell.png']
  assert path.read_bytes() == b'old picture'


def test_wrong_inputs_name_the_fix():
  with pytest.raises(ValueError, match='build one with'):
    viz.cell_graph('DARTS_V2', 'normal')
  with pytest.raises(ValueError, match="cell must be 'normal' or 'reduce'"):
    viz.cell_graph(get_genotype('DARTS_V2'), 'reduction')
  with pytest.raises(ValueError, match='NB201Arch.parse'):
    viz.nb201_graph(get_genotype('DARTS_V2'))
  with pytest.raises(ValueError, match='unknown genotype name'):
    viz.genotype_figure('NOT_A_GENOTYPE')
