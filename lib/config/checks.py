"""Value checks that types cannot express, across fields and sections; each failure is one sentence naming the fix."""
from __future__ import annotations

from typing import Any

from lib.config.schema import PSEUDO_METHODS, AugmentCfg, Config, ConfigError, ModelCfg, PseudoCfg, project_path
from lib.modelref import ModelRef
from lib.views import check_view_names


def _run_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The experiment's name and folders, and the data paths."""
    return [
        (bool(cfg.exp) and cfg.exp not in (".", "..") and not any(c in cfg.exp for c in "/\\"),
         f"exp {cfg.exp!r} must be a plain folder name (no slashes), the experiment's folder under output_root"),
        (bool(cfg.output_root.strip()), "output_root must name a folder"),
        (all(getattr(cfg.data, k).strip() for k in ("root", "train_json", "test_json", "train_images", "test_images", "taxonomy_csv")),
         "data.root, data.train_json, data.test_json, data.train_images, data.test_images and data.taxonomy_csv must not be empty"),
        (set(cfg.data.extra) <= {"fathomnet"}, f"data.extra {cfg.data.extra} names an unknown source; the one known is fathomnet"),
        (cfg.data.extra_per_concept >= 1 and cfg.data.extra_total >= 1, "data.extra_per_concept and data.extra_total must be at least 1"),
        (cfg.data.extra_weight > 0, "data.extra_weight must be positive (leave data.extra empty for no extra rows)"),
        (not cfg.data.extra or bool(cfg.data.extra_dir.strip()), "data.extra_dir must name a folder when data.extra is set"),
    ]


def _train_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Training, retraining and the model's input."""
    return [
        (cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be 0 or more"),
        (cfg.train.warmup_epochs >= 0, "train.warmup_epochs must be 0 or more"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be at least 1"),
        (cfg.train.num_workers == "auto" or cfg.train.num_workers >= 0,
         "train.num_workers must be auto (the cores per process), 0 (load in the main process) or more"),
        (0 < cfg.train.host_memory_share <= 1 and 0 < cfg.train.shm_share <= 1,
         "train.host_memory_share and train.shm_share must lie in (0, 1]"),
        (cfg.train.val_every >= 1 and cfg.train.testlike_every >= 1,
         "train.val_every and train.testlike_every must be at least 1 (1 validates every epoch)"),
        (cfg.train.epochs < 1 or cfg.train.val_every <= min(cfg.train.epochs, cfg.retrain.epochs or cfg.train.epochs),
         f"train.val_every {cfg.train.val_every} is more than the {min(cfg.train.epochs, cfg.retrain.epochs or cfg.train.epochs)} "
         f"epochs of a fold (train.epochs, retrain.epochs), so only the last epoch would validate; set train.val_every to at most "
         f"{min(cfg.train.epochs, cfg.retrain.epochs or cfg.train.epochs)}"),
        (0.0 <= cfg.model.drop_path_rate < 1.0, "model.drop_path_rate must lie in [0, 1)"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.backbone_lr_mult >= 0, "train.backbone_lr_mult must be 0 or more"),
        (cfg.train.restart_epochs > 0, "train.restart_epochs must be positive"),
        (0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio must lie in [0, 1]"),
        (cfg.train.accumulate >= 1, "train.accumulate must be at least 1 (1 = a step every batch)"),
        (0 < cfg.train.layer_decay <= 1, "train.layer_decay must lie in (0, 1] (1.0 = off; the FAU entry used 0.7)"),
        (cfg.train.clip_grad >= 0, "train.clip_grad must be 0 (off) or more"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay must lie in [0, 1)"),
        (cfg.train.patience >= 0 and cfg.train.min_delta >= 0, "train.patience and train.min_delta must be 0 or more"),
        (cfg.retrain.epochs >= 0, "retrain.epochs must be 0 (reuse train.epochs) or more"),
        (cfg.model.img_size >= 16, "model.img_size must be at least 16"),
        (len(cfg.model.context) >= 1 and cfg.model.context[0] == "1" and len(set(cfg.model.context)) == len(cfg.model.context),
         "model.context must start with 1 (the ROI itself) and name each view once, e.g. [1, 3, 5, full]"),
        (all(c in ("1", "full") or _is_number(c) for c in cfg.model.context),
         "model.context may only hold 1, context scales such as 3 or 5, and full"),
        (cfg.model.frame_layers >= 1 and cfg.model.frame_heads >= 1, "model.frame_layers and model.frame_heads must be at least 1"),
        (cfg.model.frame_width >= 1 and cfg.model.frame_width % cfg.model.frame_heads == 0,
         "model.frame_width must be a positive multiple of model.frame_heads"),
        (0.0 <= cfg.model.frame_dropout < 1.0, "model.frame_dropout must lie in [0, 1)"),
        *_fusion_checks(cfg.model),
    ]


def _fusion_checks(m: ModelCfg) -> list[tuple[bool, str]]:
    """The context fusion and the views' own backbones (model.fusion, model.view_backbones)."""
    named = [v for vb in m.view_backbones for v in vb.views]
    out = [
        (m.fusion_blocks >= 1 and m.fusion_heads >= 1, "model.fusion_blocks and model.fusion_heads must be at least 1"),
        (0.0 <= m.fusion_dropout < 1.0, "model.fusion_dropout must lie in [0, 1)"),
        (m.fusion_width >= 0, "model.fusion_width must be 0 (the backbone's feature size) or a positive width"),
        (m.gate_aux_weight >= 0, "model.gate_aux_weight must be 0 or more"),
        (m.fusion != "entropy_gate" or m.gate_aux_weight > 0,
         "model.fusion entropy_gate needs model.gate_aux_weight above 0: each view's classifier learns only from its own "
         "cross-entropy, and the gate reads their confidences; set it to 0.5"),
        (m.fusion not in ("cross_attention", "entropy_gate") or len(m.context) > 1,
         f"model.fusion {m.fusion} joins context views but model.context reads only the ROI; add views (e.g. [1, 3, full]) "
         f"or set model.fusion: concat"),
        ("1" not in named, "model.view_backbones may not name view 1: the ROI is read by model.backbone; name only context views"),
        (len(set(named)) == len(named), "model.view_backbones names a view twice; give each view one backbone"),
    ]
    for i, vb in enumerate(m.view_backbones):
        out += [
            (len(vb.views) >= 1, f"model.view_backbones[{i}] reads no view; list its views (e.g. views: [full]) or remove it"),
            (all(v in m.context for v in vb.views),
             f"model.view_backbones[{i}] names views {[v for v in vb.views if v not in m.context]} that model.context does not "
             f"read, so no input reaches that backbone; add them to model.context or remove them from its views"),
            (vb.img_size >= 16, f"model.view_backbones[{i}].img_size must be at least 16"),
            (0.0 <= vb.drop_path_rate < 1.0, f"model.view_backbones[{i}].drop_path_rate must lie in [0, 1)"),
            (vb.lr_mult is None or vb.lr_mult >= 0, f"model.view_backbones[{i}].lr_mult must be null or 0 or more"),
        ]
    return out


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
        (cfg.submit.calibrate_l2 >= 0, "submit.calibrate_l2 must be 0 or more"),
        (cfg.submit.calibrate in cfg.submit.calibrations and len(set(cfg.submit.calibrations)) == len(cfg.submit.calibrations),
         f"submit.calibrations must name each calibration once and include submit.calibrate ({cfg.submit.calibrate})"),
        (all(t > 0 for t in cfg.submit.test_totals) and all(t > 0 for t in cfg.pseudo.test_totals),
         "submit.test_totals and pseudo.test_totals must be positive counts, one per concept (or empty: equal totals)"),
        (cfg.submit.logit_tau >= 0, "submit.logit_tau must be 0 (off) or more"),
        (0.0 <= cfg.submit.backoff_tau <= 1.0, "submit.backoff_tau must lie in [0, 1]"),
        (len(cfg.submit.models) >= 1, "submit.models must name at least one model (phase1, phase2, round<r>, <exp>/<model>)"),
        (cfg.submit.greedy_rounds >= 0 and cfg.submit.greedy_bags >= 0, "submit.greedy_rounds and submit.greedy_bags must be 0 or more"),
        (0.0 < cfg.submit.greedy_bag_fraction <= 1.0, "submit.greedy_bag_fraction must lie in (0, 1]"),
        (len(cfg.submit.frame_context_buckets) >= 1 and cfg.submit.frame_context_buckets[0] == 1
         and all(a < b for a, b in zip(cfg.submit.frame_context_buckets, cfg.submit.frame_context_buckets[1:])),
         "submit.frame_context_buckets must be rising sibling counts starting at 1, e.g. [1] or [1, 2, 4]"),
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
        (1 <= cfg.demo.min_objects <= cfg.demo.random_max_objects(),
         f"demo.min_objects must be at least 1 and at most demo.max_objects ({cfg.demo.random_max_objects()})"),
        (cfg.demo.max_objects is None or cfg.demo.max_objects >= 1, "demo.max_objects must be at least 1 (or null)"),
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
    files: list[tuple[str, Any]] = [("model", cfg.model), ("knn", cfg.knn)]
    files += [(f"model.view_backbones[{i}]", vb) for i, vb in enumerate(cfg.model.view_backbones)]
    for section, part in files:
        value = part.pretrained_file
        if part.pretrained == "file" and not (value and project_path(value).is_file()):
            raise ConfigError(f"{section}.pretrained_file '{value}' is not a file; set it to a local weights file (absolute, or "
                              f"relative to the project root) or change {section}.pretrained.")


def _model_ok(name: str, rounds: int) -> bool:
    """A model name that lib.modelref.ModelRef reads, its round (if any, of this experiment) within 1..rounds."""

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
        (len(a.frame_resample_range) == 2 and 0 < a.frame_resample_range[0] <= a.frame_resample_range[1] <= 1,
         f"augment.frame_resample_range must be [low, high] with 0 < low <= high <= 1 (the frame's scale factors), "
         f"got {a.frame_resample_range}"),
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
