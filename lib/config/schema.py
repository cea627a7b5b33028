"""The config's schema: one dataclass per section, with typed defaults and a one-line comment per key.

Every stage reads one `Config`. Sections are dataclasses so a typo or a wrong type is caught
before any work (lib.config.load), with one sentence that names the key and the nearest valid one.

Over 450 lines: every key of every section with the comment that says what it does and why its default, in one place
a user reads; splitting the sections across files would scatter that reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib.core.errors import UserError
from lib.core.paths import ROOT


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; its message is one sentence naming the fix."""


# The choices of head.name and loss.name, named so that code building a HeadCfg or LossCfg from a variable can say so.
HeadName = Literal["linear", "mlp", "multi", "per_rank", "two_level", "hierarchical_softmax", "conditional", "coherent"]
LossName = Literal["ce", "weighted_ce", "focal", "class_balanced", "balanced_softmax", "logit_adjusted", "ldam", "seql", "dwce",
                   "taxonomy_smoothing", "ce_expected_distance"]


def project_path(value: str | Path) -> Path:
    """A path from a config: absolute as given, relative against the project root, never the current directory.

    So a stage finds the same files from any working directory (a Kaggle notebook runs in
    /kaggle/working with the repository under /kaggle/input). The data files are the exception:
    `DataCfg.paths` resolves them against `data.root`.
    """
    p = Path(value).expanduser()
    return p if p.is_absolute() else ROOT / p


@dataclass
class DataCfg:
    """Where the dataset lives. `root` and `taxonomy_csv`: absolute, or relative to the project root;
    the JSON files and frame folders: absolute, or relative to `root` (the two folders may be one).
    """

    root: str = "input/demo"
    train_json: str = "dataset_train.json"
    test_json: str = "dataset_test.json"
    train_images: str = "train/images"
    test_images: str = "test/images"
    taxonomy_csv: str = "configs/taxonomy/fathomnet2025.csv"
    taxonomy_source: Literal["csv", "worms"] = "csv"  # worms: look lineages up online, cached into taxonomy_csv
    # Extra training rows (lib.data.extra): [fathomnet] fetches the FathomNet Database's boxes of the concepts once
    # (online) into extra_dir (relative to root: the COCO JSON and images/), reused offline; they only ever train.
    extra: list[str] = field(default_factory=list)
    extra_dir: str = "extra/fathomnet"
    extra_per_concept: int = 300  # boxes per concept at most (the competition has about 300 per concept)
    extra_total: int = 24000  # boxes in all at most (79 x 300 = 23,700: not binding for the competition by default)
    extra_weight: float = 1.0  # scales the loss of an extra row (read by 01 and 03)

    def root_dir(self) -> Path:
        return project_path(self.root)

    def paths(self) -> dict[str, Path]:
        """The input files and folders, resolved against `root` (the taxonomy CSV against the project)."""
        root = self.root_dir()
        return {
            "train_json": root / self.train_json,
            "test_json": root / self.test_json,
            "train_images": root / self.train_images,
            "test_images": root / self.test_images,
            "taxonomy_csv": project_path(self.taxonomy_csv),
            "extra_dir": root / self.extra_dir,
            "extra_json": root / self.extra_dir / EXTRA_JSON,  # the fetched list, a COCO file (lib.data.extra)
            "extra_images": root / self.extra_dir / "images",
        }


EXTRA_JSON = "extra_fathomnet.json"  # data.extra=[fathomnet]: the FathomNet Database's boxes as saved in data.extra_dir
RANDOM_MAX_OBJECTS = 4  # demo.frames=random with demo.max_objects unset: 1..4 boxes a frame, as ever


@dataclass
class DemoCfg:
    """The synthetic FathomNet-format dataset written by `lib.demo`.

    `frames`: what shares a frame. `real` draws each frame's labels from the real FathomNet 2025 train frames
    (configs/taxonomy/fathomnet2025_train_frame_compositions.csv) until every class has its count; `random` deals the
    boxes at random into frames of `min_objects`..`max_objects` (the demo of earlier versions, byte for byte).
    `max_objects` caps a frame in both; unset, 4 when dealing at random and, for real frames, what a frame holds
    (lib/demo/compositions.py frame_capacity: 8 at 4:3), a bigger real frame subsampled at random.
    """

    per_class: int = 12
    test_per_class: int = 3
    long_tail: bool = False
    imbalance_factor: float = 100.0
    frame_width: int = 320
    frame_height: int = 240
    frames: Literal["real", "random"] = "real"  # real: real frames' label mixes (siblings often share a label); random: dealt
    min_objects: int = 1  # frames=random: fewest boxes a frame
    max_objects: int | None = None  # most boxes a frame; null: 4 dealt at random, what a frame holds for real frames

    def random_max_objects(self) -> int:
        """The most boxes of a frame dealt at random (frames=random)."""
        return RANDOM_MAX_OBJECTS if self.max_objects is None else self.max_objects


@dataclass
class PrepareCfg:
    """ROI and context crops, folds (00_prepare_data).

    `context_scales`: squares of s x the box's longer side around each box (e.g. [3, 5]);
    `context_full`: the whole frame too. Left unset (null), they are what `model.context` reads,
    filled in when the config loads, so 00 cuts no crop that no model reads (the recorded values
    are the ones used). `fill`: RGB outside the frame. `test_like`: also cut
    each train ROI downscaled to the test set's box sizes, for a test-like validation view.
    """

    pad: float = 0.1
    square: bool = True
    crop_size: int = 96
    context_scales: list[float] | None = None  # null: the numeric views of model.context
    context_full: bool | None = None  # null: whether model.context reads `full`
    fill: list[int] = field(default_factory=lambda: [0, 0, 0])
    test_like: bool = True
    n_folds: int = 5
    workers: int = 2
    max_reject_fraction: float = 0.05
    download_workers: int = 8
    download_retries: int = 3
    download_timeout: float = 30.0
    max_frame_pixels: int = 100_000_000  # a frame above this (width x height, read from its header) is refused undecoded
    holdout: list[str] = field(default_factory=list)  # concepts kept out of train (novelty experiments); test keeps them


@dataclass
class ViewBackboneCfg:
    """A second network for some context views (`model.view_backbones`), as the 2nd place read the full frame with its own
    EfficientNetV2-S at 384 px beside the ROI's EfficientNetV2-M at 224 (lib.model.streams)."""

    views: list[str] = field(default_factory=list)  # the views of model.context it reads (never 1: the ROI is model.backbone's)
    backbone: str = "tf_efficientnet_lite0"
    pretrained: Literal["none", "hub", "file", "pypi_lite0"] = "none"
    pretrained_file: str = ""
    img_size: int = 64  # its views are resized to this on the device (the loader reads every view at the largest size)
    drop_path_rate: float = 0.0
    lr_mult: float | None = None  # its learning rate over the head's; null = train.backbone_lr_mult


@dataclass
class ModelCfg:
    """Backbone and head. `pretrained`: none | hub | file | pypi_lite0 (offline tf_efficientnet_lite0)."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: Literal["none", "hub", "file", "pypi_lite0"] = "pypi_lite0"
    pretrained_file: str = ""
    img_size: int = 64
    drop_path_rate: float = 0.0
    # Views read per ROI through the shared backbone: 1 = the ROI crop, a number = that context
    # scale of prepare.context_scales, full = the whole frame. [1] reads the ROI alone.
    context: list[str] = field(default_factory=lambda: ["1"])
    # How the views' features join (lib.model.fusion): concat; attention (the ROI's pooled feature attends to the views'
    # pooled features); cross_attention (1st place's MCEAM: the ROI token queries each context view's patch tokens, a CNN's
    # final feature map flattened to tokens); entropy_gate (2nd place: each view's own prediction weighted by its confidence).
    fusion: Literal["concat", "attention", "cross_attention", "entropy_gate"] = "concat"
    fusion_blocks: int = 1  # cross_attention: attention blocks per context view (MATANet used 4)
    fusion_heads: int = 8  # cross_attention: heads (the feature size must split into them; fewer are used if it does not)
    fusion_dropout: float = 0.0  # cross_attention: dropout in the attention and its MLP (MATANet used 0.3)
    fusion_width: int = 0  # cross_attention: the blocks' width; 0 = the backbone's feature size (MATANet's); smaller projects down
    gate_aux_weight: float = 0.5  # entropy_gate: weight of each view's own cross-entropy beside the head's loss
    # Context views read by networks of their own (ViewBackboneCfg); views not named here go through `backbone`.
    view_backbones: list[ViewBackboneCfg] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        """The side the loader reads every view at: the largest any backbone reads (lib.model.streams shrinks the others')."""
        return max([self.img_size, *(vb.img_size for vb in self.view_backbones)])
    # What the other ROIs of the same frame add (lib.model.frame_attention): none = each ROI alone; attention = a
    # set-attention layer over the features of all ROIs of one frame, before the head (training and inference
    # then batch whole frames: lib.data.samplers.FrameBatchSampler; mixup/cutmix mix within a frame).
    frame_context: Literal["none", "attention"] = "none"
    frame_layers: int = 1  # attention: transformer blocks over a frame's ROIs
    frame_heads: int = 4  # attention heads of each block
    frame_width: int = 256  # the blocks' inner width (a multiple of frame_heads; the backbone's features are projected down to it)
    frame_dropout: float = 0.5  # training: each ROI sees each sibling with chance 1 - this (itself always), so no fixed context is memorised


@dataclass
class HeadCfg:
    """The classifier on top of the backbone's pooled features (lib.model.heads).

    `aux_weight` scales the auxiliary losses of per_rank, two_level, hierarchical_softmax,
    conditional and coherent (its MCLoss); `tau_coarse`/`tau_fine` are two_level's novelty
    thresholds; `routing` and `temperature` pick how conditional passes a parent level's
    distribution down. `normalized` makes the leaf classifier of linear, mlp, multi, per_rank and
    two_level a cosine one (normalised features times normalised weights, no bias): what LDAM's
    margins and scale assume, so `loss.name: ldam` asks for it (and only ldam scales cosines, by
    `loss.s`, which the probabilities then use too).
    """

    name: HeadName = "linear"
    dropout: float = 0.4  # mlp (and the hidden layer of others that use one)
    hidden: int = 512  # mlp hidden width
    n_heads: int = 8  # multi
    aux_weight: float = 1.0  # per_rank / two_level / hierarchical_softmax / conditional
    coarse_rank: Literal["phylum", "class", "order", "family", "genus"] = "order"  # two_level
    tau_coarse: float = 0.5  # two_level novelty thresholds
    tau_fine: float = 0.5
    routing: Literal["soft", "hard", "gumbel"] = "soft"  # conditional
    temperature: float = 1.0  # conditional
    normalized: bool = False  # cosine leaf classifier (LDAM's NormedLinear); linear, mlp, multi, per_rank, two_level


@dataclass
class TrainCfg:
    """Optimisation of one fold (shared by 01 and 03)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    num_workers: int | Literal["auto"] = 0  # loader workers per loader; auto: the cores per process (lib.data.budget)
    folds: list[int] = field(default_factory=list)  # empty = all folds
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs with native bf16, else fp16 + GradScaler; fp32 on CPU
    eval_batch_size: int = 128
    backbone_lr_mult: float = 0.1  # the pretrained backbone learns at this fraction of lr
    schedule: Literal["cosine", "cosine_restarts"] = "cosine"
    restart_epochs: float = 5.0  # cosine_restarts: period (T_0) in epochs
    min_lr_ratio: float = 0.01  # the schedule's floor (eta_min) as a fraction of lr
    # Micro-batches of batch_size per optimiser step (effective batch batch_size x accumulate); the schedule, EMA and
    # GradScaler count optimiser steps; an epoch's last, partial group still steps.
    accumulate: int = 1
    # Layer-wise lr decay (BEiT; the FAU entry's 0.7 over DINOv2-Base): backbone layer l of L learns at
    # lr x backbone_lr_mult x layer_decay ** (L - l) by timm's group_matcher; 1.0 = off.
    layer_decay: float = 1.0
    grad_checkpointing: bool = False  # timm's set_grad_checkpointing on the backbone: less activation memory, ~30% more compute
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # EMA of the weights, evaluated and saved instead; 0 = off
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must lower the val distance by more than this
    sampler: Literal["random", "class_balanced", "sqrt"] = "random"  # lib.data.samplers: class_balanced / sqrt oversample the tail
    val_every: int = 1  # validate every N-th epoch and the last; best and early stop count validated epochs only
    testlike_every: int = 1  # the test-like view on validated epochs that are multiples of it, the last, and each new best
    host_memory_share: float = 0.5  # the loaders' batches in flight within this share of RAM (lib.data.budget; in no record)
    shm_share: float = 0.5  # ... and this share of /dev/shm
    compile: bool = False  # torch.compile the training step (CUDA: worth it on long runs; the first steps compile)
    # Several visible GPUs (lib.engine.fold_parallel): folds = one process per GPU, each its own folds; torchrun = every fold
    # spans the GPUs (DDP); none = one process. Changes no result, so it never decides a rerun (graph.SPECS leaves it out).
    multi_gpu: Literal["folds", "torchrun", "none"] = "folds"


@dataclass
class AugmentCfg:
    """Train-time augmentation (lib.data.augment) and batch mixing (lib.data.mix); each op's probability 0 leaves it out.

    The defaults keep the spirit of the pipeline the demo was tuned with: flips, a small affine, down-then-up
    resampling (the test boxes are smaller and blurrier; 1st place's trick) and colour shifts
    towards the test frames' dimmer, bluer light. Units follow albumentations 2.0: `hue` in
    OpenCV hue steps (2 degrees), `saturation` and the RGB shifts in 0..255 pixel values.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    affine: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    translate: float = 0.05  # fraction of the side, both directions
    rotate: float = 15.0  # degrees, both directions
    shear: float = 0.0  # degrees, both directions
    brightness_contrast: float = 0.5
    brightness: float = 0.2  # fraction of the crop's mean
    contrast: float = 0.2
    clahe: float = 0.0
    hue_saturation: float = 0.3
    hue: float = 5.0
    saturation: float = 20.0
    rgb_shift: float = 0.3  # default shifts: red down, blue up (the test set's light)
    r_shift: list[float] = field(default_factory=lambda: [-40.0, 10.0])
    g_shift: list[float] = field(default_factory=lambda: [-15.0, 15.0])
    b_shift: list[float] = field(default_factory=lambda: [-10.0, 30.0])
    blur: float = 0.0  # motion or median blur, one of them
    grid_distortion: float = 0.0
    elastic: float = 0.0
    coarse_dropout: float = 0.0
    fog: float = 0.0  # turbid water
    rain: float = 0.0  # streaks, a stand-in for marine snow
    downscale: float = 0.4
    downscale_range: list[float] = field(default_factory=lambda: [0.3, 0.9])
    # the 1st place's (MATANet) whole-frame resampling: per sample, the frame down by f ~ U(range) and back, every view alike
    frame_resample: float = 0.0  # probability per sample (lib.data.resample); 0 = off
    frame_resample_range: list[float] = field(default_factory=lambda: [0.01, 1.0])
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    mix_prob: float = 0.5  # chance a batch is mixed when either alpha > 0
    mix_same_leaf: bool = False  # partners share the label, so targets stay one-hot

    def probabilities(self) -> dict[str, float]:
        """Every probability-valued setting by name (validated to lie in [0, 1])."""
        names = ("hflip", "vflip", "affine", "brightness_contrast", "clahe", "hue_saturation", "rgb_shift", "blur",
                 "grid_distortion", "elastic", "coarse_dropout", "fog", "rain", "downscale", "frame_resample", "mix_prob")
        return {n: getattr(self, n) for n in names}

    @property
    def mixing(self) -> bool:
        """True when batches may be mixed (soft targets)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class LossCfg:
    """The training loss (lib.model.losses.build_loss); parameters unused by the chosen loss are ignored."""

    name: LossName = "ce"
    label_smoothing: float = 0.0  # ce, weighted_ce, ce_expected_distance
    gamma: float = 2.0  # focal; class_balanced with cb_base focal
    beta: float = 0.9999  # effective-number class weights (class_balanced, focal_class_weights, ldam DRW)
    focal_class_weights: bool = False  # focal with effective-number class weights
    cb_base: Literal["softmax", "sigmoid", "focal"] = "softmax"
    tau: float = 1.0  # logit_adjusted
    max_m: float = 0.5  # ldam
    s: float = 30.0  # ldam
    drw_start_epoch: int = -1  # ldam deferred re-weighting from this epoch (0-based); -1 never
    seql_gamma: float = 0.9  # seql: probability of suppressing a tail class's negative gradient
    seql_lambda: float = 0.00177  # seql: frequency threshold of tail classes (fraction of samples)
    alpha: float = 0.1  # taxonomy_smoothing: mass spread over the other classes
    ts_beta: float = 1.0  # taxonomy_smoothing: exp(-ts_beta * distance)
    # taxonomy_smoothing's distance: lca (linnaeus: 2 x levels to the lowest common ancestor), the default because it scored
    # better out of fold on the demo (CV 2.114 against 2.195, OOF min-risk 2.210 against 2.246, seed 42), or metric (the competition's)
    ts_distance: Literal["metric", "lca"] = "lca"
    ed_lambda: float = 0.1  # ce_expected_distance


PSEUDO_METHODS = ("confidence", "vote", "cluster_core")


@dataclass
class PseudoCfg:
    """Pseudo-label selection (02, lib.decide.pseudo); the selected `methods` are merged, one row per test ROI.

    confidence: mean top probability >= `threshold`. vote: at least `min_agree` models (0 = all)
    share the argmax and the gated-marginal-uncertainty score U >= `u_floor` (`gmu_sigma` picks
    whose sigma gates it). cluster_core: UMAP (`umap_*`) + KMeans on test embeddings; clusters
    whose majority prediction has a share >= `purity` label their `core_fraction` nearest the
    centre. Weights enter 03 as weight**`weight_power`; `rounds` pseudo-label/retrain rounds.
    """

    threshold: float = 0.96
    weight_power: float = 1.0
    methods: list[str] = field(default_factory=lambda: ["confidence"])
    min_agree: int = 0  # models whose argmax must agree (vote); 0 = all of them
    u_floor: float = 0.0  # vote: minimum U = mu_max * (1 - exp(-GMU)), in [0, 1]
    gmu_sigma: Literal["top2", "largest2"] = "largest2"  # sigma of the two top-mu classes, or the two largest sigma
    umap_components: int = 2
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_metric: Literal["cosine", "euclidean", "manhattan", "correlation", "chebyshev"] = "cosine"
    purity: float = 0.9  # cluster_core: minimum share of a cluster's majority predicted label
    core_fraction: float = 0.5  # cluster_core: share of a pure cluster, nearest its centroid, that is labelled
    min_cluster_size: int = 3  # cluster_core: smaller clusters are skipped (a cluster of one is always "pure")
    rounds: int = 1
    members: list[str] = field(default_factory=lambda: ["phase1"])  # the fold ensembles that label: phase1, <exp>/<model>
    calibrate: Literal["none", "temperature"] = "none"  # a log-loss temperature per member, fitted on its out-of-fold rows
    # stack: each member's test probabilities (after pseudo.calibrate) adjusted by what the other ROIs of their frame say
    # (lib.decide.frame_context: log q = log p + b log(eps + siblings' mean), b and eps fitted on its out-of-fold rows)
    # before the selection; none: each ROI alone
    frame_context: Literal["none", "stack"] = "none"
    # label shift (lib.decide.prior) on the members' test probabilities before the selection: em re-estimates the test
    # set's class prior (Saerens et al. 2002) and reweights; balanced scales the matrix to equal class totals (or to
    # `test_totals`, one per concept in taxonomy order); none: as predicted
    test_prior: Literal["none", "em", "balanced"] = "none"
    test_totals: list[float] = field(default_factory=list)


@dataclass
class RetrainCfg:
    """Phase 2 (03). `epochs: 0` reuses train.epochs."""

    epochs: int = 0


@dataclass
class SubmitCfg:
    """Blend and decoding (04; lib.decide.blending, weights and decode).

    `models`: phase1, phase2, round<r> of this experiment and <exp>/<one of those> of another
    experiment under output_root trained on the same folds. `calibrate`: temperature fits one
    temperature per model on its out-of-fold rows (and one more on the blend) to
    `calibrate_objective` (logloss, or distance: the out-of-fold min-risk distance) before blending.
    `blend`: uniform; cv, softmax(-CV distance / cv_temperature); fit, simplex weights fitted on
    the models' out-of-fold probabilities to `fit_objective` (distance: a smooth min-risk
    distance; logloss); greedy, Caruana's forward selection with replacement (`greedy_rounds`
    additions, `greedy_bags` bagged repetitions over `greedy_bag_fraction` of the models, 0 = no
    bagging). `logit_tau` > 0 divides out the train prior (post-hoc logit adjustment).
    `backoff_rank` (empty = off): rows whose top probability is below `backoff_tau` are answered
    by min-risk among concepts at or above that rank. `frame_context: stack` lets the other ROIs of
    a frame adjust each ROI's blended probabilities before decoding (README: Frame context).
    """

    decode: Literal["argmax", "min_risk"] = "argmax"
    models: list[str] = field(default_factory=lambda: ["phase1", "phase2"])
    # temperature: it lowered the nested out-of-fold min-risk distance on the demo; vector, dirichlet: lib.decide.calibration
    calibrate: Literal["none", "temperature", "vector", "dirichlet"] = "temperature"
    calibrate_objective: Literal["logloss", "distance"] = "logloss"  # temperature's; tied with distance there, and steadier
    # the calibrations the options table (and so the rule) compares; dirichlet fits C x C parameters per model and nested fold
    calibrations: list[Literal["none", "temperature", "vector", "dirichlet"]] = field(
        default_factory=lambda: ["none", "temperature", "vector", "dirichlet"])
    calibrate_l2: float = 0.01  # vector and dirichlet: L2 pull of the maps toward identity (dirichlet's off-diagonal and biases: ODIR)
    # true: each model's out-of-fold rows predicted again by its fold models with its tta views (cached in probs/), so that
    # calibrators fit on rows predicted the way the test rows are; false: the rows the training stage stored (one view)
    oof_tta: bool = True
    # how a model's fold models' test probabilities combine: mean (of probabilities), log (geometric mean, renormalised),
    # matched (geometric mean sharpened by one temperature, fitted on the test rows without labels, so that its mean top
    # probability equals the fold models' own: a mean of calibrated models is underconfident)
    fold_average: Literal["mean", "log", "matched"] = "matched"
    # label shift (lib.decide.prior) after calibration, blending and frame context, before decoding: em re-estimates the
    # test prior (Saerens et al. 2002) and reweights; balanced scales to equal class totals or to `test_totals` (one per
    # concept in taxonomy order); none: as predicted
    test_prior: Literal["none", "em", "balanced"] = "none"
    test_totals: list[float] = field(default_factory=list)
    # rule: submit the option (blend, calibration, frame context, prior, decoding) of least nested out-of-fold distance
    # (README: Which option 04 submits); settings: submit exactly the submit.* values above
    pick: Literal["rule", "settings"] = "rule"
    # the class mix the rule's `shifted` score weights out-of-fold rows to (pi_test[y] / pi_train[y]): train (no weights:
    # the nested score), totals (submit.test_totals, or equal totals when empty: FathomNet 2025's test holds about ten
    # ROIs per class), estimated (EM's label-free estimate on the test rows, shrunk toward the train prior by as many
    # pseudo-rows per class as the test set has rows per class: on 237 demo rows raw EM put 39 of 79 classes at 0)
    pick_prior: Literal["train", "totals", "estimated"] = "train"
    blend: Literal["uniform", "cv", "fit", "greedy"] = "uniform"
    cv_temperature: float = 0.1
    fit_objective: Literal["distance", "logloss"] = "distance"
    greedy_rounds: int = 20
    greedy_bags: int = 0
    greedy_bag_fraction: float = 0.5
    logit_tau: float = 0.0
    backoff_rank: Literal["", "kingdom", "phylum", "class", "order", "family", "genus", "species"] = ""
    backoff_tau: float = 0.5
    # stack: after blending and calibration, before decoding, each ROI's probabilities adjusted by what the other ROIs of
    # its frame say (lib.decide.frame_context: log q = log p + b log(eps + siblings' mean), b and eps fitted on out-of-fold
    # rows); none: each ROI alone. options.csv scores both either way (nested out of fold) to choose by. Default stack:
    # on the demo with real frame structure (3 seeds) it lowered the nested out-of-fold distance of all 36 options, by 0.10
    # (min-risk) and 0.07 (argmax) on average; on a dataset of one ROI per frame it changes nothing (b = 0)
    frame_context: Literal["none", "stack"] = "stack"
    # stack's b per bucket of sibling counts, from these lower edges: [1] one b (two parameters in all); [1, 2, 4] a b for
    # 1, 2-3 and 4+ siblings (nested out of fold it beat [1] on synthetic rows over the real frames, see README)
    frame_context_buckets: list[int] = field(default_factory=lambda: [1])


@dataclass
class TtaCfg:
    """Test-time augmentation of 02 and 04 (lib.engine.inference): view names (lib.views) and how their probabilities combine.

    `mode`: prob averages the probabilities; log takes their geometric mean (renormalised).
    """

    views: list[str] = field(default_factory=lambda: ["identity"])
    mode: Literal["prob", "log"] = "prob"


@dataclass
class KnnCfg:
    """FAISS kNN baseline (knn_baseline.py; lib.decide.knn).

    `source`: backbone, a pretrained timm model (backbone, pretrained, img_size below); phase1,
    01's fold models (model.* and head.*; each fold's CV and index embedded by the model that
    never saw that fold). `index`: flat (exact) or ivf (nlist lists, nprobe probed; nlist capped
    at base size / 39). `votes`: the protocols scored by CV; `vote`: the one the submission
    uses, `best` = the lowest CV distance among `votes`.
    """

    source: Literal["backbone", "phase1"] = "backbone"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: Literal["none", "hub", "file", "pypi_lite0"] = "pypi_lite0"
    pretrained_file: str = ""
    img_size: int = 64
    k: int = 10
    index: Literal["flat", "ivf"] = "flat"
    nlist: int = 100
    nprobe: int = 10
    votes: list[Literal["flat", "hierarchical", "strict", "min_risk"]] = field(
        default_factory=lambda: ["flat", "hierarchical", "strict", "min_risk"])
    vote: Literal["best", "flat", "hierarchical", "strict", "min_risk"] = "best"
    batch_size: int = 128


@dataclass
class EnsembleCfg:
    """`make ensemble` (scripts/train_ensemble.py): the config files of the member experiments this one blends, each trained
    (the stages its members need) before this experiment's own stages. Read by no stage: it decides no rerun."""

    recipes: list[str] = field(default_factory=list)


@dataclass
class TrackCfg:
    """Experiment tracking (lib.pipeline.track) through the tool's own client, an optional install: wandb (offline unless
    WANDB_MODE says otherwise), mlflow (a local file store), tensorboard (event files). In no stage's fingerprint:
    it decides no rerun, and a tracker that fails is one warning, never a failed stage."""

    backend: Literal["none", "wandb", "mlflow", "tensorboard"] = "none"
    project: str = ""  # wandb project / MLflow experiment; "" = the config's exp
    dir: str = ""  # where runs are written (wandb's dir, the MLflow store, the event files); "" = output_root/<exp>/track


@dataclass
class Config:
    """The whole experiment. `output_root/exp` holds every stage's folder."""

    exp: str = "demo"
    seed: int = 42
    output_root: str = "output"
    data: DataCfg = field(default_factory=DataCfg)
    demo: DemoCfg = field(default_factory=DemoCfg)
    prepare: PrepareCfg = field(default_factory=PrepareCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)
    retrain: RetrainCfg = field(default_factory=RetrainCfg)
    submit: SubmitCfg = field(default_factory=SubmitCfg)
    tta: TtaCfg = field(default_factory=TtaCfg)
    knn: KnnCfg = field(default_factory=KnnCfg)
    ensemble: EnsembleCfg = field(default_factory=EnsembleCfg)
    track: TrackCfg = field(default_factory=TrackCfg)

    @property
    def out_root(self) -> Path:
        """`output_root`, absolute or relative to the project root (lib.config.project_path)."""
        return project_path(self.output_root)

    @property
    def out_dir(self) -> Path:
        return self.out_root / self.exp

    def section(self, name: str) -> Any:
        """A value or section by dotted name (`seed`, `train`, `pseudo.weight_power`)."""
        obj: Any = self
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
