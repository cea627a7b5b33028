"""Typed configuration: dataclass defaults, YAML files, dotted CLI overrides, validation.

Every stage reads one `Config`. Sections are dataclasses so a typo or a wrong type is caught
before any work, with one sentence that names the key and the nearest valid one. The resolved
config is saved beside each stage's outputs (see `lib.stages`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lib.core.errors import UserError
from lib.core.paths import ROOT
from lib.views import check_view_names


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; its message is one sentence naming the fix."""


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
        }


@dataclass
class DemoCfg:
    """The synthetic FathomNet-format dataset written by `lib.demo`."""

    per_class: int = 12
    test_per_class: int = 3
    long_tail: bool = False
    imbalance_factor: float = 100.0
    frame_width: int = 320
    frame_height: int = 240
    min_objects: int = 1
    max_objects: int = 4


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
    fusion: Literal["concat", "attention"] = "concat"


@dataclass
class HeadCfg:
    """The classifier on top of the backbone's pooled features (lib.heads).

    `aux_weight` scales the auxiliary losses of per_rank, two_level, hierarchical_softmax,
    conditional and coherent (its MCLoss); `tau_coarse`/`tau_fine` are two_level's novelty
    thresholds; `routing` and `temperature` pick how conditional passes a parent level's
    distribution down. `normalized` makes the leaf classifier of linear, mlp, multi, per_rank and
    two_level a cosine one (normalised features times normalised weights, no bias): what LDAM's
    margins and scale assume, so `loss.name: ldam` asks for it (and only ldam scales cosines, by
    `loss.s`, which the probabilities then use too).
    """

    name: Literal["linear", "mlp", "multi", "per_rank", "two_level", "hierarchical_softmax", "conditional", "coherent"] = "linear"
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
    num_workers: int = 0
    folds: list[int] = field(default_factory=list)  # empty = all folds
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs with native bf16, else fp16 + GradScaler; fp32 on CPU
    eval_batch_size: int = 128
    backbone_lr_mult: float = 0.1  # the pretrained backbone learns at this fraction of lr
    schedule: Literal["cosine", "cosine_restarts"] = "cosine"
    restart_epochs: float = 5.0  # cosine_restarts: period (T_0) in epochs
    min_lr_ratio: float = 0.01  # the schedule's floor (eta_min) as a fraction of lr
    accumulate: int = 1  # gradient accumulation steps
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # EMA of the weights, evaluated and saved instead; 0 = off
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must lower the val distance by more than this
    sampler: Literal["random", "class_balanced", "sqrt"] = "random"  # lib.samplers: class_balanced / sqrt oversample the tail
    compile: bool = False  # torch.compile the training step (CUDA: worth it on long runs; the first steps compile)


@dataclass
class AugmentCfg:
    """Train-time augmentation (lib.augment) and batch mixing (lib.mix); each op's probability 0 leaves it out.

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
    mixup_alpha: float = 0.0  # 0 = off
    cutmix_alpha: float = 0.0  # 0 = off
    mix_prob: float = 0.5  # chance a batch is mixed when either alpha > 0
    mix_same_leaf: bool = False  # partners share the label, so targets stay one-hot

    def probabilities(self) -> dict[str, float]:
        """Every probability-valued setting by name (validated to lie in [0, 1])."""
        names = ("hflip", "vflip", "affine", "brightness_contrast", "clahe", "hue_saturation", "rgb_shift", "blur",
                 "grid_distortion", "elastic", "coarse_dropout", "fog", "rain", "downscale", "mix_prob")
        return {n: getattr(self, n) for n in names}

    @property
    def mixing(self) -> bool:
        """True when batches may be mixed (soft targets)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class LossCfg:
    """The training loss (lib.losses.build_loss); parameters unused by the chosen loss are ignored."""

    name: Literal["ce", "weighted_ce", "focal", "class_balanced", "balanced_softmax", "logit_adjusted", "ldam", "seql", "dwce",
                  "taxonomy_smoothing", "ce_expected_distance"] = "ce"
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
    """Pseudo-label selection (02, lib.pseudo); the selected `methods` are merged, one row per test ROI.

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


@dataclass
class RetrainCfg:
    """Phase 2 (03). `epochs: 0` reuses train.epochs."""

    epochs: int = 0


@dataclass
class SubmitCfg:
    """Blend and decoding (04; lib.ensemble).

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
    by min-risk among concepts at or above that rank.
    """

    decode: Literal["argmax", "min_risk"] = "argmax"
    models: list[str] = field(default_factory=lambda: ["phase1", "phase2"])
    calibrate: Literal["none", "temperature"] = "temperature"  # on: it lowered the nested out-of-fold min-risk distance on the demo
    calibrate_objective: Literal["logloss", "distance"] = "logloss"  # tied with distance there, and its temperatures are steadier
    blend: Literal["uniform", "cv", "fit", "greedy"] = "uniform"
    cv_temperature: float = 0.1
    fit_objective: Literal["distance", "logloss"] = "distance"
    greedy_rounds: int = 20
    greedy_bags: int = 0
    greedy_bag_fraction: float = 0.5
    logit_tau: float = 0.0
    backoff_rank: Literal["", "kingdom", "phylum", "class", "order", "family", "genus", "species"] = ""
    backoff_tau: float = 0.5


@dataclass
class TtaCfg:
    """Test-time augmentation of 02 and 04 (lib.engine.inference): view names (lib.views) and how their probabilities combine.

    `mode`: prob averages the probabilities; log takes their geometric mean (renormalised).
    """

    views: list[str] = field(default_factory=lambda: ["identity"])
    mode: Literal["prob", "log"] = "prob"


@dataclass
class KnnCfg:
    """FAISS kNN baseline (knn_baseline.py; lib.knn).

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


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; int -> float is the only silent widening."""
    origin = typing.get_origin(tp)
    bad = ConfigError(
        f"Config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
        f"fix it in the YAML file or the command line."
    )
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = [str(a) for a in typing.get_args(tp)]
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(
                f"Config key '{key}' has unknown value {value!r}{hint}; choose one of {', '.join(choices)}."
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # exp: 2025 is a name, not a number
        raise bad
    raise bad


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Config key '{prefix.rstrip('.')}' must be a mapping of settings, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{k}" for k in fields]
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}."
            raise ConfigError(f"Unknown config key '{full}'; {hint}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`train.epochs=4` -> {'train': {'epochs': 4}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' is not of the form key=value (for example train.epochs=4).")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _read_yaml(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file's settings, on top of those of the file its `base:` names (relative to the project root or to the
    file), recursively: a member recipe states only what differs from the recipe it starts from."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p
    if not p.is_file():
        raise ConfigError(f"Config file '{p}' does not exist; pass an existing YAML file with --config.")
    if p.resolve() in chain:
        raise ConfigError(f"Config file '{p}' names itself as a base (through base:); break the cycle.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file '{p}' is not valid YAML ({e.__class__.__name__}); fix its syntax.") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{p}' must be a mapping of settings; fix its contents.")
    base = raw.pop("base", None)
    if base is None:
        return raw
    near = p.parent / str(base)
    return _merge(_read_yaml(near if near.is_file() else str(base), (*chain, p.resolve())), raw)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (on top of its `base:` file, if any) <- overrides, then validated.

    A relative `path` (a command-line argument) is looked up in the current directory, then in the
    project, so `--config configs/demo.yaml` works from any working directory.
    """
    raw: dict = _read_yaml(path) if path is not None else {}
    for o in overrides:
        raw = _merge(raw, parse_override(o))
    cfg = _build(Config, raw, "")
    validate(cfg)
    _fill_context_crops(cfg)
    return cfg


def _fill_context_crops(cfg: Config) -> None:
    """Unset `prepare.context_scales` / `context_full` become the crops `model.context` reads (after validation)."""
    p, views = cfg.prepare, cfg.model.context
    if p.context_scales is None:
        p.context_scales = [float(v) for v in views if v not in ("1", "full")]
    if p.context_full is None:
        p.context_full = "full" in views


def _run_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The experiment's name and folders, and the data paths."""
    return [
        (bool(cfg.exp) and cfg.exp not in (".", "..") and not any(c in cfg.exp for c in "/\\"),
         f"exp {cfg.exp!r} must be a plain folder name (no slashes), the experiment's folder under output_root"),
        (bool(cfg.output_root.strip()), "output_root must name a folder"),
        (all(getattr(cfg.data, k).strip() for k in ("root", "train_json", "test_json", "train_images", "test_images", "taxonomy_csv")),
         "data.root, data.train_json, data.test_json, data.train_images, data.test_images and data.taxonomy_csv must not be empty"),
    ]


def _train_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Training, retraining and the model's input."""
    return [
        (cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be 0 or more"),
        (cfg.train.warmup_epochs >= 0, "train.warmup_epochs must be 0 or more"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be at least 1"),
        (cfg.train.num_workers >= 0, "train.num_workers must be 0 (load in the main process) or more"),
        (0.0 <= cfg.model.drop_path_rate < 1.0, "model.drop_path_rate must lie in [0, 1)"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.backbone_lr_mult >= 0, "train.backbone_lr_mult must be 0 or more"),
        (cfg.train.restart_epochs > 0, "train.restart_epochs must be positive"),
        (0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio must lie in [0, 1]"),
        (cfg.train.accumulate >= 1, "train.accumulate must be at least 1"),
        (cfg.train.clip_grad >= 0, "train.clip_grad must be 0 (off) or more"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay must lie in [0, 1)"),
        (cfg.train.patience >= 0 and cfg.train.min_delta >= 0, "train.patience and train.min_delta must be 0 or more"),
        (cfg.retrain.epochs >= 0, "retrain.epochs must be 0 (reuse train.epochs) or more"),
        (cfg.model.img_size >= 16, "model.img_size must be at least 16"),
        (len(cfg.model.context) >= 1 and cfg.model.context[0] == "1" and len(set(cfg.model.context)) == len(cfg.model.context),
         "model.context must start with 1 (the ROI itself) and name each view once, e.g. [1, 3, 5, full]"),
        (all(c in ("1", "full") or _is_number(c) for c in cfg.model.context),
         "model.context may only hold 1, context scales such as 3 or 5, and full"),
    ]


def _prepare_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Crops, folds and downloads of 00."""
    return [
        (cfg.prepare.crop_size >= 16, "prepare.crop_size must be at least 16"),
        (cfg.prepare.n_folds >= 2, "prepare.n_folds must be at least 2"),
        (cfg.prepare.pad >= 0, "prepare.pad must be 0 or more"),
        (cfg.prepare.workers >= 1, "prepare.workers must be at least 1"),
        (all(s > 0 for s in cfg.prepare.context_scales or []), "prepare.context_scales must all be positive"),
        (len(cfg.prepare.fill) == 3 and all(0 <= v <= 255 for v in cfg.prepare.fill), "prepare.fill must be three values in 0..255 (RGB)"),
        (0.0 <= cfg.prepare.max_reject_fraction <= 1.0, "prepare.max_reject_fraction must lie in [0, 1]"),
        (cfg.prepare.download_workers >= 1 and cfg.prepare.download_retries >= 0 and cfg.prepare.download_timeout > 0,
         "prepare.download_workers must be at least 1, download_retries 0 or more and download_timeout positive"),
        (cfg.prepare.max_frame_pixels >= 1, "prepare.max_frame_pixels must be a positive number of pixels (e.g. 100000000)"),
    ]


NORMALIZABLE_HEADS = ("linear", "mlp", "multi", "per_rank", "two_level")  # heads whose leaf logits come from one Linear


def _loss_head_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Loss and head parameters."""
    return [
        (0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing must lie in [0, 1)"),
        (cfg.loss.gamma >= 0, "loss.gamma must be 0 or more"),
        (0.0 <= cfg.loss.beta < 1.0, "loss.beta must lie in [0, 1)"),
        (cfg.loss.tau >= 0, "loss.tau must be 0 or more"),
        (cfg.loss.max_m > 0, "loss.max_m must be positive"),
        (cfg.loss.s > 0, "loss.s must be positive"),
        (0.0 <= cfg.loss.seql_gamma <= 1.0, "loss.seql_gamma must lie in [0, 1]"),
        (cfg.loss.seql_lambda >= 0, "loss.seql_lambda must be 0 or more"),
        (0.0 <= cfg.loss.alpha < 1.0, "loss.alpha must lie in [0, 1)"),
        (cfg.loss.ed_lambda >= 0, "loss.ed_lambda must be 0 or more"),
        (0.0 <= cfg.head.dropout < 1.0, "head.dropout must lie in [0, 1)"),
        (cfg.head.hidden >= 1, "head.hidden must be at least 1"),
        (cfg.head.n_heads >= 1, "head.n_heads must be at least 1"),
        (cfg.head.aux_weight >= 0, "head.aux_weight must be 0 or more"),
        (0.0 <= cfg.head.tau_coarse <= 1.0 and 0.0 <= cfg.head.tau_fine <= 1.0, "head.tau_coarse and head.tau_fine must lie in [0, 1]"),
        (cfg.head.temperature > 0, "head.temperature must be positive"),
        (not cfg.head.normalized or cfg.head.name in NORMALIZABLE_HEADS,
         f"head.normalized=true is for the heads {', '.join(NORMALIZABLE_HEADS)} (a cosine leaf classifier), not "
         f"head.name={cfg.head.name}; set head.normalized=false or pick one of them"),
        (not cfg.head.normalized or cfg.loss.name == "ldam",
         "head.normalized=true gives cosine logits in [-1, 1] that only loss.name=ldam scales (by loss.s); set "
         "head.normalized=false or loss.name=ldam"),
        (cfg.loss.name != "ldam" or cfg.head.normalized,
         "loss.name=ldam assumes cosine logits in [-1, 1] (the LDAM authors' normalised classifier: its margins and "
         "loss.s=30 blow raw logits up); set head.normalized=true with a linear, mlp, multi, per_rank or two_level head"),
    ]


def _knn_submit_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The kNN baseline, the folds to train and the submission's models and blend."""
    return [
        (cfg.knn.img_size >= 16, "knn.img_size must be at least 16"),
        (cfg.knn.k >= 1, "knn.k must be at least 1"),
        (cfg.knn.nlist >= 1 and cfg.knn.nprobe >= 1, "knn.nlist and knn.nprobe must be at least 1"),
        (cfg.knn.batch_size >= 1, "knn.batch_size must be at least 1"),
        (len(cfg.knn.votes) >= 1 and len(set(cfg.knn.votes)) == len(cfg.knn.votes), "knn.votes must list at least one protocol, each once"),
        (cfg.knn.vote == "best" or cfg.knn.vote in cfg.knn.votes, f"knn.vote '{cfg.knn.vote}' must be best or one of knn.votes"),
        (cfg.submit.cv_temperature > 0, "submit.cv_temperature must be positive"),
        (cfg.submit.logit_tau >= 0, "submit.logit_tau must be 0 (off) or more"),
        (0.0 <= cfg.submit.backoff_tau <= 1.0, "submit.backoff_tau must lie in [0, 1]"),
        (len(cfg.submit.models) >= 1, "submit.models must name at least one model (phase1, phase2, round<r>, <exp>/<model>)"),
        (cfg.submit.greedy_rounds >= 0 and cfg.submit.greedy_bags >= 0, "submit.greedy_rounds and submit.greedy_bags must be 0 or more"),
        (0.0 < cfg.submit.greedy_bag_fraction <= 1.0, "submit.greedy_bag_fraction must lie in (0, 1]"),
        (all(0 <= f < cfg.prepare.n_folds for f in cfg.train.folds), "train.folds must list fold numbers below prepare.n_folds"),
        (all(_model_ok(m, cfg.pseudo.rounds) for m in cfg.submit.models),
         "submit.models may only name phase1, phase2, round<r> with r from 1 to pseudo.rounds, and <exp>/<one of those> "
         "of another experiment"),
        (len(set(cfg.submit.models)) == len(cfg.submit.models), "submit.models must name each model once"),
        (all(not m.startswith(f"{cfg.exp}/") for m in [*cfg.submit.models, *cfg.pseudo.members]),
         f"submit.models and pseudo.members name this experiment's own models without the '{cfg.exp}/' prefix"),
        (len(cfg.pseudo.members) >= 1 and all(_model_ok(m, cfg.pseudo.rounds) and (m == "phase1" or "/" in m) for m in cfg.pseudo.members),
         "pseudo.members may only name phase1 (this experiment's) and <exp>/<model> of other experiments"),
        (len(set(cfg.pseudo.members)) == len(cfg.pseudo.members), "pseudo.members must name each model once"),
    ]


def _demo_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The synthetic dataset."""
    return [
        (cfg.demo.per_class >= 1 and cfg.demo.test_per_class >= 1, "demo.per_class and demo.test_per_class must be at least 1"),
        (1 <= cfg.demo.min_objects <= cfg.demo.max_objects, "demo.min_objects must be at least 1 and at most demo.max_objects"),
        (cfg.demo.imbalance_factor >= 1, "demo.imbalance_factor must be at least 1"),
    ]


def validate(cfg: Config) -> None:
    """Value checks that types cannot express; each failure is one sentence."""
    checks = [*_run_checks(cfg), *_train_checks(cfg), *_prepare_checks(cfg), *_loss_head_checks(cfg), *_knn_submit_checks(cfg),
              *_demo_checks(cfg)]
    checks += _augment_checks(cfg.augment)
    checks += _pseudo_checks(cfg.pseudo)
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{msg}; fix it in the config or on the command line.")
    try:
        check_view_names(cfg.tta.views)
    except ValueError as e:
        raise ConfigError(f"tta.views: {e}") from e
    for key, value in (("model.pretrained_file", cfg.model.pretrained_file), ("knn.pretrained_file", cfg.knn.pretrained_file)):
        section = key.split(".")[0]
        if getattr(cfg, section).pretrained == "file" and not (value and project_path(value).is_file()):
            raise ConfigError(f"{key} '{value}' is not a file; set it to a local weights file (absolute, or relative to "
                              f"the project root) or change {section}.pretrained.")


def _model_ok(name: str, rounds: int) -> bool:
    """A model name that lib.core.graph.ModelRef reads, its round (if any, of this experiment) within 1..rounds."""
    from lib.core.graph import ModelRef  # the one reader of model names (it imports this module)

    try:
        ref = ModelRef.parse(name)
    except ValueError:
        return False
    return ref.round is None or 1 <= ref.round <= rounds or (ref.exp is not None and ref.round >= 1)


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _ordered(values: list[float], lo: float, hi: float) -> bool:
    """Two values, low <= high, both in [lo, hi]."""
    return len(values) == 2 and lo <= values[0] <= values[1] <= hi


def _augment_checks(a: AugmentCfg) -> list[tuple[bool, str]]:
    checks = [(0.0 <= p <= 1.0, f"augment.{name} is a probability and must lie in [0, 1], got {p:g}")
              for name, p in a.probabilities().items()]
    return checks + [
        (len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1], "augment.scale must be two positive numbers [low, high] with low <= high"),
        (0.0 <= a.translate < 1.0, "augment.translate must lie in [0, 1) (a fraction of the side)"),
        (0.0 <= a.rotate <= 180.0, "augment.rotate must lie in [0, 180] degrees"),
        (0.0 <= a.shear < 90.0, "augment.shear must lie in [0, 90) degrees"),
        (0.0 <= a.brightness <= 1.0 and 0.0 <= a.contrast <= 1.0, "augment.brightness and augment.contrast must lie in [0, 1]"),
        (0.0 <= a.hue <= 180.0, "augment.hue must lie in [0, 180]"),
        (0.0 <= a.saturation <= 255.0, "augment.saturation must lie in [0, 255]"),
        (all(_ordered(r, -255.0, 255.0) for r in (a.r_shift, a.g_shift, a.b_shift)),
         "augment.r_shift, g_shift and b_shift must each be [low, high] with -255 <= low <= high <= 255"),
        (len(a.downscale_range) == 2 and 0 < a.downscale_range[0] <= a.downscale_range[1] <= 1,
         "augment.downscale_range must be [low, high] with 0 < low <= high <= 1"),
        (a.mixup_alpha >= 0 and a.cutmix_alpha >= 0, "augment.mixup_alpha and augment.cutmix_alpha must be 0 (off) or more"),
    ]


def _pseudo_checks(p: PseudoCfg) -> list[tuple[bool, str]]:
    unknown = [m for m in p.methods if m not in PSEUDO_METHODS]
    return [
        (0.0 <= p.threshold <= 1.0, "pseudo.threshold must lie in [0, 1]"),
        (p.weight_power >= 0, "pseudo.weight_power must be 0 (equal weights) or more"),
        (len(p.methods) >= 1 and not unknown,
         f"pseudo.methods must list one or more of {', '.join(PSEUDO_METHODS)}"
         + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else "")),
        (len(set(p.methods)) == len(p.methods), "pseudo.methods must not repeat a method"),
        (p.min_agree >= 0, "pseudo.min_agree must be 0 (all models) or a positive number of models"),
        (0.0 <= p.u_floor <= 1.0, "pseudo.u_floor must lie in [0, 1]"),
        (p.umap_components >= 2, "pseudo.umap_components must be at least 2 (the plot draws two)"),
        (p.umap_neighbors >= 2, "pseudo.umap_neighbors must be at least 2"),
        (0.0 <= p.umap_min_dist <= 1.0, "pseudo.umap_min_dist must lie in [0, 1] (UMAP's spread is 1)"),
        (0.0 < p.purity <= 1.0, "pseudo.purity must lie in (0, 1]"),
        (0.0 < p.core_fraction <= 1.0, "pseudo.core_fraction must lie in (0, 1]"),
        (p.min_cluster_size >= 1, "pseudo.min_cluster_size must be at least 1"),
        (p.rounds >= 1, "pseudo.rounds must be at least 1"),
    ]


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config (for YAML dumps and fingerprints)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}, so changes can be named key by key."""
    value = to_dict(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
