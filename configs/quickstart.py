"""Quick start: an NA-DARTS search on scikit-learn's embedded digits (no download).

Launch:
  python -m nanas_jax.main --config=configs/quickstart.py --workdir=/tmp/nanas_quickstart
  ... --config.search.algorithm=darts                      # the DARTS baseline
  ... --config.model.space=nb201 --config.model.layers=1   # NAS-Bench-201, 1 cell a stage

Cost, measured alone on a 2-core CPU (2026-12-07, an AMD EPYC Zen 4, the compilation
cache cold): NA-DARTS 3 min 7 s (first step, mostly compilation, 34.5 s); DARTS 2 min 27 s
(36.1 s); NAS-Bench-201 with one cell a stage 41-44 s (first step 8-9 s). Measured:
alpha's mean entropy 82 % (DARTS 79 %, NAS-Bench-201 62 %) of uniform, the genotype
unchanged over the last 2 (DARTS 5) epochs, supernet validation accuracy 0.99
(NAS-Bench-201 0.96, and its genotype does not settle: skip_connect and avg_pool_3x3 stay
tied on 5 of its 6 edges, see the README).

Sizes, reduced from the paper's (8 cells, C=16, 32x32 CIFAR, 50 epochs of 390 steps) so
that the search runs on a laptop: 8x8x1 digits, 5 cells, C=4, batch 32, the first 1000
shuffled digits (500 train the weights, 500 alpha; the other 797 stay held out for
retraining), 20 epochs of 15 steps.

Schedule, from the DARTS family's published practice, sized by measurement (README, "A
search that searches"): on 8x8 digits the supernet fits within a few epochs and the alpha
gradient fades to noise, so alpha has to move in the few hundred steps the signal lasts.
- 2 weight-only warm-up epochs before the architecture steps start (PC-DARTS, P-DARTS);
- the architecture learning rate raised from DARTS's 3e-4 to 0.15 and cosine-annealed to 0
  over the architecture steps (as the weights' rate is), so alpha settles at the end;
- no L2 term on alpha (DARTS: 1e-3, added before Adam's normalisation, where it outweighs
  the digits' fading gradient and pulls alpha back to uniform).
The paper-sized configs (`configs/darts_cifar10.py` and the others built on it) keep
DARTS's values: no warm-up, 3e-4 constant, 1e-3.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.log_every_steps = 5

  # Orbax checkpoints in WORKDIR/checkpoints: at every epoch end, on SIGTERM and Ctrl-C,
  # every `every_steps` steps when > 0 and `every_seconds` after the last one when > 0
  # (the most a kill or a crash loses); the last `keep` are kept. Rerunning a command
  # resumes from them.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 0
  config.checkpoint.every_seconds = 60.0
  config.checkpoint.keep = 3

  # Data parallel over every local device needs no setting. Several processes (TPU pod
  # slices, SLURM): `distributed='auto'` initialises jax.distributed when the environment
  # says so, 'on' always; the three fields below are detected by JAX when left None.
  config.parallel = ml_collections.ConfigDict()
  config.parallel.distributed = "auto"
  config.parallel.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  config.parallel.num_processes = ml_collections.FieldReference(None, field_type=int)
  config.parallel.process_id = ml_collections.FieldReference(None, field_type=int)

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.train_portion = 0.5
  config.data.batch_size = 32
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  # The first 1000 shuffled digits (500 train the weights, 500 alpha); the other 797 stay
  # unseen, the test split of configs/pipeline_quickstart.py and configs/study_digits.py.
  config.data.max_examples = ml_collections.FieldReference(1000, field_type=int)

  config.model = ml_collections.ConfigDict()
  config.model.space = "darts"
  config.model.channels = 4
  config.model.layers = 5
  config.model.steps = 4
  config.model.multiplier = 4
  config.model.stem_multiplier = 3
  # 'auto': on a CPU 'taps' for batches of 2048 pixels or more (this one's 32 x 8 x 8) and
  # 'scan' for smaller ones (compile time), 'conv' on a GPU (cuDNN's grouped convolutions,
  # one a dilation), 'conv_each' on a TPU (one convolution a kernel; 'taps_fused' is the
  # accelerators' other, without convolutions); or one of them by name
  # (nanas_jax.nn.functional).
  config.model.depthwise_impl = "auto"
  # A cell's inner nodes, in either space: 'scan' (one loop body: the shortest compile),
  # 'unroll' (exactly their edges: less work, memory and kernel launches), or 'auto':
  # DARTS's 'unroll' on accelerators and for CIFAR-sized batches on a CPU, else 'scan';
  # NAS-Bench-201's 'unroll' everywhere, since XLA:CPU runs a dense convolution inside a
  # loop slowly (resolve_inner_impl in nanas_jax.nn.supernet and .nb201_supernet).
  config.model.inner_impl = "auto"

  config.search = ml_collections.ConfigDict()
  config.search.algorithm = "na_darts"
  config.search.order = "first"
  config.search.epochs = 20
  # Weight-only epochs before the architecture steps start (PC-DARTS, P-DARTS).
  config.search.warmup_epochs = 2
  # The per-epoch validation re-estimates the BatchNorm statistics at softmax(alpha) on
  # this many training batches (0: the running statistics).
  config.search.recalibrate_batches = 4
  # 'shared': every phase of the step calls one compiled supernet gradient (compiles once).
  # 'fused': the whole step is one jit. 'auto': 'fused' for first-order DARTS without
  # warm-up epochs on a CPU, else 'shared' (see nanas_jax/search/bilevel.py). 'loop'
  # (first order): one jit whose gradients are the iterations of one loop, the shortest
  # compile for DARTS's supernet, for a step 6-11 % slower (short searches on a CPU; on a
  # GPU it launches more kernels and waits on the device at every gate: it warns).
  config.search.compile = "auto"
  # The dtype the supernet computes in: 'bfloat16' runs its convolutions and matmuls in
  # bfloat16 (for GPUs and TPUs) while parameters, alpha, optimizer states and BatchNorm
  # statistics stay float32.
  config.search.dtype = "float32"
  # On a GPU, whether XLA times candidate kernels on the GPU as it compiles the search's
  # programs (its default: minutes of a first step at CIFAR size), or takes cuDNN's and
  # cuBLAS's heuristics (False; see nanas_jax/search/bilevel.py, GPU_WITHOUT_AUTOTUNING).
  config.search.gpu_autotune = False

  config.search.weights = ml_collections.ConfigDict()
  config.search.weights.lr = 0.025
  config.search.weights.lr_min = 0.001
  config.search.weights.momentum = 0.9
  config.search.weights.weight_decay = 3e-4
  config.search.weights.grad_clip = 5.0

  config.search.arch = ml_collections.ConfigDict()
  config.search.arch.lr = 0.15
  config.search.arch.b1 = 0.5
  config.search.arch.b2 = 0.999
  config.search.arch.weight_decay = 0.0
  config.search.arch.init_scale = 1e-3
  # 'constant' (DARTS) or 'cosine': annealed to 0 over the architecture steps.
  config.search.arch.schedule = "cosine"

  config.search.neighbors = ml_collections.ConfigDict()
  config.search.neighbors.num = 4
  config.search.neighbors.kind = "swap"
  config.search.neighbors.radius = 1
  config.search.neighbors.include_center = False
  config.search.neighbors.aggregation = "mean"
  config.search.neighbors.tau = 1.0
  config.search.neighbors.eps = 0.5
  config.search.neighbors.sigma = 0.3
  config.search.neighbors.batch = "full"
  # 'vmap' evaluates the K neighbors in one batched call; 'loop' calls the shared compiled
  # gradient K times (no extra compile). 'auto': vmap on accelerators; on a CPU, from
  # CIFAR-sized batches one neighbor at a time in one program (chunk 1 unless set), on
  # smaller ones (the digits) loop; NAS-Bench-201's supernet loops on a CPU at any size.
  config.search.neighbors.evaluate = "auto"
  # With 'vmap', how many neighbors one batched pass evaluates (0: all at once); the passes
  # run one after the other, so the pass's memory grows with chunk, not with num. XLA's GPU
  # program at the reference size (benchmarks/gpu_compile.py, H200, inner nodes unrolled):
  # K=4 all at once needs 1.37x DARTS's memory and launches 7,256 kernels a step (DARTS
  # 7,124); in pairs 1.0x and 10,263 (the pairs run as a loop). A chunk that does not
  # divide num compiles a second, remainder-sized pass. With 'auto', 0 means one at a time
  # on a CPU and on a TPU: for one v5e chip, XLA's TPU compiler estimates K=4 one at a time
  # at 940 ms a step in 8.88 GB, against 1,197 ms in 15.30 GB (of 15.75) all at once.
  config.search.neighbors.chunk = 0
  return config
