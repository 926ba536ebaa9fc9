"""Pictures of cells (DARTS genotypes, NAS-Bench-201 cells) drawn with matplotlib alone.

No graphviz: the layout is computed here, so a pip-only machine (matplotlib, no system
packages, no display) renders them. A cell is first turned into a ``CellGraph`` (nodes and
``(source, target, op)`` edges, pure data that tests compare with the architecture), then
laid out in layers from left to right: a node's layer is one more than its deepest input.
Edges that skip layers, and repeated edges between the same two nodes, are drawn as arcs
so they do not run on top of each other; every operation edge carries its op name.

    from nanas_jax import viz
    viz.plot_genotype(get_genotype('DARTS_V2'), 'darts_v2.svg')   # normal + reduction cell
    viz.plot_nb201(NB201Arch.parse(text), 'cell.png')
    viz.plot_arch(get_space('darts'), genotype, 'cell.png')        # dispatch on the space

Files are written atomically (a temporary file in the target directory, then
``os.replace``), so a reader never sees half a picture and a failed save leaves nothing
behind. The format comes from the extension: ``.png`` or ``.svg``; SVG keeps text as text,
so op names stay searchable.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import tempfile
from typing import Any

import matplotlib
from matplotlib import patches
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nanas_jax.spaces import base
from nanas_jax.spaces import darts
from nanas_jax.spaces import genotypes
from nanas_jax.spaces import nb201

# Node names of a DARTS cell as the DARTS paper labels them.
DARTS_INPUTS = ('c_{k-2}', 'c_{k-1}')
DARTS_OUTPUT = 'c_{k}'

FORMATS = {'.png': 'png', '.svg': 'svg'}

# Geometry in data units; the figure is scaled at INCHES_PER_UNIT, so text sizes in points
# stay legible whatever the number of nodes.
_LAYER_GAP = 3.0
_NODE_GAP = 1.4
_NODE_WIDTH = 0.75
_NODE_HEIGHT = 0.42
_MARGIN = 0.5
# A node box's rounded padding, and the gap between an arrow's ends and the boxes (points,
# matplotlib's default shrink).
_BOX_PAD = 0.02
_ARROW_GAP_POINTS = 2.0
_INCHES_PER_UNIT = 0.9
# Arc bends (matplotlib ``arc3`` rad) an edge may take, and the spread of repeated edges
# between the same two nodes.
_BENDS = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45)
_PARALLEL_RAD = 0.3
# Where along its edge a label may sit, middle first; the size of label text (7 pt) in
# data units, for keeping labels apart.
_LABEL_TS = tuple(sorted((i / 50 for i in range(10, 41)), key=lambda t: abs(t - 0.5)))
_LABEL_CHAR_WIDTH = 0.075
_LABEL_HEIGHT = 0.2

_INPUT_COLOR = 'darkseagreen'
_NODE_COLOR = 'lightblue'
_OUTPUT_COLOR = 'palegoldenrod'


@dataclasses.dataclass(frozen=True)
class CellGraph:
  """A cell as a directed graph.

  Attributes:
    nodes: node names in topological order (inputs first).
    inputs: the nodes without incoming edges.
    output: the node drawn as the cell output.
    edges: ``(source, target, op)``; ``op`` is None for the concatenation edges that feed
      a DARTS cell's output.
  """

  nodes: tuple[str, ...]
  inputs: tuple[str, ...]
  output: str
  edges: tuple[tuple[str, str, str | None], ...]


def cell_graph(genotype: darts.Genotype, cell: str = 'normal') -> CellGraph:
  """The graph of one DARTS cell: inputs c_{k-2}, c_{k-1}; nodes '0'..; output c_{k}.

  Each ``(op, source)`` pair of node ``n`` becomes an edge ``source -> n`` labelled
  ``op`` (state 0 is c_{k-2}, 1 is c_{k-1}, 2 + k is node k); each state in the concat
  list gets an unlabelled edge into c_{k}.
  """
  if not isinstance(genotype, darts.Genotype):
    raise ValueError(
        f'cell_graph expects a Genotype, got {type(genotype).__name__}; build one with '
        'get_genotype(name) or Genotype.parse(text).')
  if cell not in ('normal', 'reduce'):
    raise ValueError(f"cell must be 'normal' or 'reduce', got {cell!r}.")
  states = DARTS_INPUTS + tuple(str(k) for k in range(genotype.num_nodes(cell)))
  edges = [(states[source], states[darts.NUM_CELL_INPUTS + position // darts.INPUTS_PER_NODE],
            op)
           for position, (op, source) in enumerate(getattr(genotype, cell))]
  edges += [(states[state], DARTS_OUTPUT, None)
            for state in getattr(genotype, f'{cell}_concat')]
  return CellGraph(nodes=states + (DARTS_OUTPUT,), inputs=DARTS_INPUTS,
                   output=DARTS_OUTPUT, edges=tuple(edges))


def nb201_graph(arch: nb201.NB201Arch) -> CellGraph:
  """The graph of a NAS-Bench-201 cell: nodes '0' (input) .. '3' (output), all 6 edges.

  ``none`` edges are kept (the cut is part of the architecture); the plot draws them
  dashed.
  """
  if not isinstance(arch, nb201.NB201Arch):
    raise ValueError(
        f'nb201_graph expects an NB201Arch, got {type(arch).__name__}; build one with '
        'NB201Arch.parse(text).')
  nodes = tuple(str(i) for i in range(nb201.NUM_NODES))
  edges = tuple((str(source), str(target), op)
                for target, inputs in enumerate(arch.nodes, start=1)
                for op, source in inputs)
  return CellGraph(nodes=nodes, inputs=nodes[:1], output=nodes[-1], edges=edges)


def layer_of(graph: CellGraph) -> dict[str, int]:
  """Layer of every node: 0 for inputs, else one more than its deepest source."""
  sources = collections.defaultdict(list)
  for source, target, _ in graph.edges:
    sources[target].append(source)
  layers = {}
  for node in graph.nodes:
    if node in graph.inputs:
      layers[node] = 0
      continue
    missing = [s for s in sources[node] if s not in layers]
    if missing or not sources[node]:
      raise ValueError(
          f'node {node!r} has no inputs or reads {missing} listed after it; list '
          'CellGraph.nodes in topological order, inputs first.')
    layers[node] = 1 + max(layers[s] for s in sources[node])
  return layers


def layout(graph: CellGraph) -> dict[str, tuple[float, float]]:
  """Node centres: x by layer, y spread evenly within a layer.

  Inputs keep their order (first on top); the nodes of later layers are sorted by the
  mean height of their sources, the usual barycentre heuristic that removes most edge
  crossings.
  """
  layers = layer_of(graph)
  sources = collections.defaultdict(list)
  for source, target, _ in graph.edges:
    sources[target].append(source)
  positions = {}
  for layer in range(max(layers.values()) + 1):
    nodes = [n for n in graph.nodes if layers[n] == layer]
    if layer:
      nodes.sort(key=lambda n: -sum(positions[s][1] for s in sources[n]) / len(sources[n]))
    for i, node in enumerate(nodes):
      positions[node] = (layer * _LAYER_GAP, ((len(nodes) - 1) / 2 - i) * _NODE_GAP)
  return positions


def _arc_point(start, end, rad: float, t: float) -> tuple[float, float]:
  """The point at parameter ``t`` of matplotlib's ``arc3`` curve from ``start`` to ``end``.

  ``arc3`` is a quadratic Bezier whose control point is the chord midpoint moved by
  ``rad * (dy, -dx)``; it is computed on screen, which equals data units here because the
  axes keep an equal aspect ratio.
  """
  (x0, y0), (x1, y1) = start, end
  cx = (x0 + x1) / 2 + rad * (y1 - y0)
  cy = (y0 + y1) / 2 - rad * (x1 - x0)
  a, b, c = (1 - t) ** 2, 2 * (1 - t) * t, t ** 2
  return a * x0 + b * cx + c * x1, a * y0 + b * cy + c * y1


_Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in data units.


def _overlap(a: _Box, b: _Box) -> float:
  """Area shared by two boxes."""
  return (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
          * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))


def _node_box(center, pad: float = 0.0) -> _Box:
  x, y = center
  return (x - _NODE_WIDTH / 2 - pad, y - _NODE_HEIGHT / 2 - pad,
          x + _NODE_WIDTH / 2 + pad, y + _NODE_HEIGHT / 2 + pad)


def _label_box(center, text: str) -> _Box:
  x, y = center
  half_w, half_h = len(text) * _LABEL_CHAR_WIDTH / 2, _LABEL_HEIGHT / 2
  return x - half_w, y - half_h, x + half_w, y + half_h


def _route(graph: CellGraph, positions) -> tuple[list[float], list[tuple[float, float]]]:
  """Per edge, an ``arc3`` bend and a label position.

  Bends: repeated edges between the same two nodes fan out symmetrically; any other edge
  takes the smallest bend (straight first) whose curve misses every other node's box, the
  sides alternating.
  Labels, shortest edge first: each op name goes to the point along its curve (nearest
  the middle on ties) whose text box overlaps nodes and earlier labels least, then covers
  other edges least, so a label does not sit on a crossing where it could be read as
  another edge's.
  """
  multiplicity = collections.Counter((s, t) for s, t, _ in graph.edges)
  seen = collections.Counter()
  samples = [i / 40 for i in range(1, 40)]
  rads, side = [], 1.0
  for source, target, _ in graph.edges:
    start, end = positions[source], positions[target]
    count = multiplicity[(source, target)]
    if count > 1:
      rads.append(_PARALLEL_RAD * (seen[(source, target)] - (count - 1) / 2))
      seen[(source, target)] += 1
      continue
    others = [_node_box(positions[n], pad=0.05) for n in graph.nodes
              if n not in (source, target)]

    def hits(rad, start=start, end=end, others=others):
      points = [_arc_point(start, end, rad, t) for t in samples]
      return sum(any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in points)
                 for b in others)
    # Smallest bend first; between equal bends, the side opposite to the previous bend,
    # so skipping edges alternate above and below. min() keeps the first of ties.
    bends = sorted(_BENDS, key=lambda r: (abs(r), -r * side))
    rads.append(min(bends, key=hits))
    if rads[-1]:
      side = -1.0 if rads[-1] > 0 else 1.0
  curves = [[_arc_point(positions[s], positions[t], rad, u) for u in samples]
             for (s, t, _), rad in zip(graph.edges, rads)]
  taken = [_node_box(positions[n]) for n in graph.nodes]
  labels = [None] * len(graph.edges)
  # Short edges first: they have the least room for their label.
  by_length = sorted(range(len(graph.edges)), key=lambda i: math.dist(
      positions[graph.edges[i][0]], positions[graph.edges[i][1]]))
  for index in by_length:
    (source, target, op), rad = graph.edges[index], rads[index]
    if op is None:
      continue
    crossing = [p for i, curve in enumerate(curves) if i != index for p in curve]

    def cost(center, op=op, crossing=crossing):
      box = _label_box(center, op)
      covered = sum(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y in crossing)
      return sum(_overlap(box, b) for b in taken), covered

    best = min((_arc_point(positions[source], positions[target], rad, t)
                for t in _LABEL_TS), key=cost)
    taken.append(_label_box(best, op))
    labels[index] = best
  return rads, labels


def _inside_node(point, center) -> bool:
  """Whether ``point`` lies within the drawn box of the node at ``center`` (its rounded
  corners taken square)."""
  return (abs(point[0] - center[0]) <= _NODE_WIDTH / 2 + _BOX_PAD
          and abs(point[1] - center[1]) <= _NODE_HEIGHT / 2 + _BOX_PAD)


def _arrow_shrinks(start, end, rad: float) -> tuple[float, float]:
  """``(shrinkA, shrinkB)`` in points for an ``arc3`` arrow between two node centres: how
  far from each centre the curve crosses the node's box, plus matplotlib's default gap.

  matplotlib cuts a connector's path where it leaves a circle of radius ``shrinkA``
  around its start (``shrinkB``, its end), so these radii end the arrow on the boxes'
  outlines, as clipping it with the box patches (``patchA``, ``patchB``) would. That
  clipping tests thousands of points against the boxes' Bezier outlines at every draw:
  2/3 of a picture's time.
  """
  def crossing(t_center: float) -> float:
    # Bisection on the curve parameter, between the node's end of the curve (inside its
    # box) and the middle (outside: nodes are apart).
    center = _arc_point(start, end, rad, t_center)
    inside, outside = t_center, 0.5
    for _ in range(30):
      mid = (inside + outside) / 2
      if _inside_node(_arc_point(start, end, rad, mid), center):
        inside = mid
      else:
        outside = mid
    return math.dist(center, _arc_point(start, end, rad, inside))

  points_per_unit = 72 * _INCHES_PER_UNIT
  return tuple(crossing(t) * points_per_unit + _ARROW_GAP_POINTS for t in (0.0, 1.0))


def _node_label(name: str) -> str:
  return f'${name}$' if '_{' in name else name


@dataclasses.dataclass(frozen=True)
class _Drawing:
  """Where everything of one cell goes, in data units."""
  positions: dict[str, tuple[float, float]]
  rads: list[float]
  labels: list[tuple[float, float] | None]
  extent: tuple[float, float, float, float]  # x0, x1, y0, y1 with a margin.


def _plan(graph: CellGraph) -> _Drawing:
  positions = layout(graph)
  rads, labels = _route(graph, positions)
  # Node boxes, label boxes and the arcs' bulges all stay inside the axes.
  boxes = [_node_box(p) for p in positions.values()]
  boxes += [_label_box(p, op) for p, (_, _, op) in zip(labels, graph.edges) if p]
  points = [_arc_point(positions[s], positions[t], rad, 0.5)
            for (s, t, _), rad in zip(graph.edges, rads)]
  boxes += [(x, y, x, y) for x, y in points]
  extent = (min(b[0] for b in boxes) - _MARGIN, max(b[2] for b in boxes) + _MARGIN,
            min(b[1] for b in boxes) - _MARGIN, max(b[3] for b in boxes) + _MARGIN)
  return _Drawing(positions, rads, labels, extent)


def draw_cell(ax: Axes, graph: CellGraph, title: str | None = None) -> None:
  """Draws ``graph`` on ``ax``: boxes for nodes, arrows for edges, op names on edges."""
  _draw_planned(ax, graph, _plan(graph), title)


def _draw_planned(ax: Axes, graph: CellGraph, plan: _Drawing, title: str | None) -> None:
  positions = plan.positions
  for node in graph.nodes:
    x, y = positions[node]
    color = (_INPUT_COLOR if node in graph.inputs
             else _OUTPUT_COLOR if node == graph.output else _NODE_COLOR)
    ax.add_patch(patches.FancyBboxPatch(
        (x - _NODE_WIDTH / 2, y - _NODE_HEIGHT / 2), _NODE_WIDTH, _NODE_HEIGHT,
        boxstyle=f'round,pad={_BOX_PAD}', facecolor=color, edgecolor='black', zorder=2))
    ax.text(x, y, _node_label(node), ha='center', va='center', fontsize=10, zorder=3)
  for (source, target, op), rad, label in zip(graph.edges, plan.rads, plan.labels):
    start, end = positions[source], positions[target]
    # The arrow starts and ends on the node boxes' outlines.
    shrink_a, shrink_b = _arrow_shrinks(start, end, rad)
    ax.add_patch(patches.FancyArrowPatch(
        start, end, connectionstyle=f'arc3,rad={rad}', arrowstyle='-|>',
        mutation_scale=10, shrinkA=shrink_a, shrinkB=shrink_b,
        color='gray' if op in (None, 'none') else 'black',
        linestyle='--' if op == 'none' else '-', linewidth=1.0, zorder=1))
    if op is not None:
      ax.text(*label, op, ha='center', va='center', fontsize=7, zorder=4,
              bbox={'boxstyle': 'round,pad=0.15', 'facecolor': 'white',
                    'edgecolor': 'none', 'alpha': 0.85})
  x0, x1, y0, y1 = plan.extent
  ax.set_xlim(x0, x1)
  ax.set_ylim(y0, y1)
  ax.set_aspect('equal')
  ax.axis('off')
  if title:
    ax.set_title(title, fontsize=11)


def _figure(graphs: list[CellGraph], titles: list[str]) -> Figure:
  """One panel per graph, side by side, each scaled at the same inches per data unit."""
  plans = [_plan(g) for g in graphs]  # planned once: it routes every edge and label
  extents = [plan.extent for plan in plans]
  widths = [x1 - x0 for x0, x1, _, _ in extents]
  height = max(y1 - y0 for _, _, y0, y1 in extents)
  # A bare Figure (no pyplot) needs no display and joins no global figure registry.
  title_room = 0.6
  fig = Figure(figsize=(sum(widths) * _INCHES_PER_UNIT,
                        (height + title_room) * _INCHES_PER_UNIT))
  # Axes fill the figure, so a data unit is INCHES_PER_UNIT wide as the label sizes assume.
  fig.subplots_adjust(left=0, right=1, bottom=0, top=height / (height + title_room),
                      wspace=0)
  axes = fig.subplots(1, len(graphs), squeeze=False,
                      gridspec_kw={'width_ratios': widths})[0]
  for ax, graph, plan, title in zip(axes, graphs, plans, titles):
    _draw_planned(ax, graph, plan, title)
  return fig


def genotype_figure(genotype: darts.Genotype | str) -> Figure:
  """The normal and reduction cells of a DARTS genotype (or its name / text), unsaved."""
  genotype = genotypes.get_genotype(genotype)
  return _figure([cell_graph(genotype, 'normal'), cell_graph(genotype, 'reduce')],
                 ['normal cell', 'reduction cell'])


def nb201_figure(arch: nb201.NB201Arch | str) -> Figure:
  """A NAS-Bench-201 cell (or its ``|op~j|+...`` string), unsaved."""
  if isinstance(arch, str):
    arch = nb201.NB201Arch.parse(arch)
  return _figure([nb201_graph(arch)], ['NAS-Bench-201 cell'])


def image_format(path: str | os.PathLike) -> str:
  """'png' or 'svg' from the path's extension; ValueError for anything else."""
  extension = os.path.splitext(os.fspath(path))[1].lower()
  if extension not in FORMATS:
    raise ValueError(
        f'cannot tell the image format of {os.fspath(path)!r}: end the path in '
        f'{" or ".join(FORMATS)}.')
  return FORMATS[extension]


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
  """Writes ``fig`` to ``path`` atomically; returns the path.

  The picture goes to a temporary file in the same directory (so ``os.replace`` is a
  rename on one file system), which is removed again if saving fails.
  """
  path = os.fspath(path)
  fmt = image_format(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f'cannot write {path!r}: directory {directory!r} does not exist; create it first.')
  fd, temp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                              suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      # 'none' keeps SVG text as <text> elements instead of glyph outlines.
      with matplotlib.rc_context({'svg.fonttype': 'none'}):
        fig.savefig(f, format=fmt, dpi=150, bbox_inches='tight')
    # mkstemp makes the file private (0600); a picture is shared like any other output.
    os.chmod(temp, 0o644)
    os.replace(temp, path)
  except BaseException:
    if os.path.exists(temp):
      os.unlink(temp)
    raise
  return path


def plot_genotype(genotype: darts.Genotype | str, path: str | os.PathLike) -> str:
  """Draws a DARTS genotype's normal and reduction cells to ``path`` (.png / .svg)."""
  image_format(path)  # Fail on a bad extension before drawing anything.
  return save_figure(genotype_figure(genotype), path)


def plot_nb201(arch: nb201.NB201Arch | str, path: str | os.PathLike) -> str:
  """Draws a NAS-Bench-201 cell to ``path`` (.png / .svg); ``none`` edges dashed."""
  image_format(path)
  return save_figure(nb201_figure(arch), path)


def plot_arch(space: base.SearchSpace | str, arch: Any, path: str | os.PathLike) -> str:
  """Draws an architecture (or its text) of ``space`` ('darts' / 'nb201' or the space)."""
  if isinstance(space, str):
    space = base.get_space(space)
  if isinstance(arch, str):
    arch = space.parse(arch)
  plotters = {'darts': plot_genotype, 'nb201': plot_nb201}
  if space.name not in plotters:
    raise ValueError(
        f'no cell picture for search space {space.name!r}; spaces with pictures: '
        f'{sorted(plotters)}.')
  return plotters[space.name](arch, path)
