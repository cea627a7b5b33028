"""Frame context: what the other ROIs of a frame (its siblings) say about each one, as a product of two experts.

The ROIs of one frame are often of one species or of a few related ones: in the real FathomNet
train labels an ROI with siblings has its label among theirs 83% of the time. `adjust` turns an
ROI's probabilities p and the mean m of its siblings' into

    log q = log p + b * log(eps + m)    (renormalised over the concepts)

b >= 0 is how much the siblings are trusted (0: p unchanged) and eps > 0 how much room a concept
that no sibling shows keeps (small eps: nearly ruled out). `fit` picks them on out-of-fold rows by
the log loss of q: a proper scoring rule, which min-risk decoding needs since it trusts the
probabilities (why 04's calibration fits log loss too); convex in b for a fixed eps; and it keeps
04's blend code (lib.decide.weights' distance surrogate) out of 02's and 03's code digests. A row
without siblings is returned as it is, bit for bit, and so is every row when b = 0.

Siblings are every other ROI of the same frame (the COCO `image_id` of 00's rois.csv, within one
split: train and test image ids overlap in the real data). A train ROI rejected in 00 is not a row
of rois.csv, so it is nobody's sibling; a test placeholder (a test ROI without a crop) is a sibling
carrying the train prior's distribution, flagged (`FrameIndex.placeholders`): it is never a row
adjusted here (the submission answers it by the prior). Sibling means come from per-frame sums
(one sparse product, O(N C)), never from pairs, so a frame of hundreds of ROIs costs what its rows do.

Leak-freedom: folds are grouped by frame (lib.data.folds), so a row's siblings are held out with
it and their out-of-fold probabilities come from a model that never saw the frame; `check_grouped`
stops when a frame straddles folds. The parameters are fitted on out-of-fold rows only, never on
test rows; a nested score (`nested`) fits on the other folds' rows and adjusts the held-out fold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.errors import StageError
from lib.core.io import content_key

EPS = 1e-12  # probabilities are clipped here before their log
B_MAX = 20.0
LOG_EPS_BOUNDS = (float(np.log(1e-6)), float(np.log(10.0)))
STARTS = (1e-3, 1e-2, 1e-1, 1.0)  # eps of the candidate starts (b = 1); the optimiser runs from the best
EDGES = (1,)  # one bucket: every row with at least one sibling shares b (two parameters in all)
NOTHING_TO_USE = ("frame context: every ROI is alone in its frame (one ROI per image_id), so there is nothing to use; "
                  "results are the same with it on or off")


# ----------------------------------------------------------------------------- frames of rows


@dataclass(frozen=True, eq=False)
class Siblings:
    """Rows grouped by frame: each row's frame as a dense index, then each placeholder's, and every row's sibling count."""

    group: np.ndarray  # (N + E,) dense frame index of the N rows, then of the E placeholders
    n_rows: int
    count: np.ndarray  # (N,) siblings of each row: the other rows and placeholders of its frame

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    @property
    def any(self) -> bool:
        """Whether some row has a sibling (else there is nothing to use)."""
        return bool(self.count.any())

    def subset(self, rows: np.ndarray) -> "Siblings":
        """The siblings among `rows` only (a bool mask or indices of rows; placeholders dropped): what a nested fold sees."""
        return siblings(self.group[: self.n_rows][rows])


def siblings(frame: np.ndarray, placeholder_frame: np.ndarray | None = None) -> Siblings:
    """Group rows (and placeholders, which are siblings but not rows) by their frame id, of any dtype."""
    frame = np.asarray(frame)
    extra = np.asarray(placeholder_frame if placeholder_frame is not None else np.zeros(0, dtype=frame.dtype))
    both = np.concatenate([frame, extra]) if len(extra) else frame
    _, group = np.unique(both, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    sizes = np.bincount(group) if len(group) else np.zeros(0, dtype=np.int64)
    return Siblings(group, len(frame), sizes[group[: len(frame)]] - 1)


def group_sums(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group, the sum of its rows of `values` (R, C): one sparse (G, R) @ (R, C) product, O(R C)."""
    from scipy.sparse import csr_matrix

    r = len(group)
    member = csr_matrix((np.ones(r), (group, np.arange(r))), shape=(n_groups, r))
    return np.asarray(member @ np.asarray(values, dtype=np.float64))


def sibling_mean(probs: np.ndarray, sib: Siblings, prior: np.ndarray | None = None) -> np.ndarray:
    """Per row, the mean of its siblings' distributions (placeholders carry `prior`); zeros where it has none.

    The frame's sum minus the row itself, over the sibling count: O(N C) whatever the frame sizes.
    """
    p = np.asarray(probs, dtype=np.float64)
    n_extra = len(sib.group) - sib.n_rows
    if n_extra:
        if prior is None:
            raise ValueError("Placeholders are siblings with the train prior's distribution; pass prior.")
        p_all = np.vstack([p, np.broadcast_to(np.asarray(prior, dtype=np.float64), (n_extra, p.shape[1]))])
    else:
        p_all = p
    sums = group_sums(p_all, sib.group, sib.n_groups)
    rest = np.clip(sums[sib.group[: sib.n_rows]] - p, 0.0, None)  # clip: the subtraction may leave -1e-17
    return rest / np.maximum(sib.count, 1)[:, None]


class FoldsNotGrouped(StageError):
    """A frame whose out-of-fold rows lie in several folds: its siblings' probabilities may have seen it."""


def check_grouped(frame: np.ndarray, fold: np.ndarray) -> None:
    """Stop in one sentence when a frame's out-of-fold rows come from several folds (its siblings would have been trained on)."""
    df = pd.DataFrame({"frame": np.asarray(frame), "fold": np.asarray(fold)})
    spread = df.groupby("frame")["fold"].nunique()
    bad = spread[spread > 1]
    if len(bad):
        f = bad.index[0]
        raise FoldsNotGrouped(f"{len(bad)} frame(s) have ROIs in several folds (image_id {f} in folds "
                         f"{sorted(set(df.loc[df['frame'] == f, 'fold'].tolist()))}), so a sibling's out-of-fold probabilities "
                         "could come from a model trained on that frame; frame context needs folds grouped by frame: "
                         "rerun 00_prepare_data.py --force (its folds are) instead of using a custom fold assignment.")


@dataclass(frozen=True, eq=False)
class FrameIndex:
    """The frames of 00's ROIs: each train ROI's frame and fold, each usable test ROI's frame, the placeholders' frames and
    the train prior (the placeholders' distribution)."""

    train: pd.DataFrame  # indexed by annotation_id: image_id, fold
    test: pd.Series  # annotation_id -> image_id of the usable test ROIs
    placeholders: np.ndarray  # image_id of every test ROI without a crop
    prior: np.ndarray  # (C,) usable train ROIs per class, normalised

    @classmethod
    def from_rois(cls, rois: pd.DataFrame, n_classes: int) -> "FrameIndex":
        """From rois.csv (lib.data.artifacts.Prepared.rois): rejected train ROIs are not in it, test placeholders are (ok 0)."""
        train = rois[rois["split"] == "train"]
        test = rois[rois["split"] == "test"]
        usable = train[train["ok"] == 1]
        counts = np.bincount(usable["label"].to_numpy(dtype=np.int64), minlength=n_classes).astype(np.float64)
        prior = counts / counts.sum() if counts.sum() else np.full(n_classes, 1.0 / n_classes)
        return cls(usable.set_index("annotation_id")[["image_id", "fold"]],
                   test[test["ok"] == 1].set_index("annotation_id")["image_id"],
                   test.loc[test["ok"] != 1, "image_id"].to_numpy(), prior)

    def train_frames(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frame, fold) of train ROIs by annotation id; an id 00 does not list is one sentence."""
        missing = pd.Index(ids).difference(self.train.index)
        if len(missing):
            raise StageError(f"{len(missing)} out-of-fold rows (annotation id {missing[0]}, ...) are not usable train ROIs of "
                             "00's rois.csv; rerun the training stages after 00_prepare_data.py.")
        rows = self.train.loc[np.asarray(ids)]
        return rows["image_id"].to_numpy(), rows["fold"].to_numpy()

    def test_frames(self, ids: np.ndarray) -> np.ndarray:
        missing = pd.Index(ids).difference(self.test.index)
        if len(missing):
            raise StageError(f"{len(missing)} test rows (annotation id {missing[0]}, ...) are not usable test ROIs of 00's "
                             "rois.csv; rerun the stage after 00_prepare_data.py.")
        return self.test.loc[np.asarray(ids)].to_numpy()

    def rows(self, oof_ids: np.ndarray, oof_fold: np.ndarray | None, test_ids: np.ndarray) -> "FrameRows":
        """The frames of a model set's out-of-fold and test rows, checked to be grouped by fold (rois.csv's folds, and
        `oof_fold`, the fold each row was held out of, when known)."""
        frame, fold = self.train_frames(oof_ids)
        check_grouped(frame, fold)
        if oof_fold is not None:
            check_grouped(frame, oof_fold)
        test = self.test_frames(test_ids)
        folds = np.asarray(oof_fold if oof_fold is not None else fold)
        key = content_key("frames", [_int64(frame), _int64(folds)])  # what a fit reads: never the test rows
        return FrameRows(siblings(frame), siblings(test, self.placeholders), self.prior, key)


def frame_rows(index: FrameIndex, oof_ids: np.ndarray, oof_fold: np.ndarray | None, test_ids: np.ndarray, required: bool
               ) -> tuple[FrameRows | None, str]:
    """The rows' frames and a note for the report: `NOTHING_TO_USE` when no ROI has a sibling. Folds not grouped by frame
    stop a run that asks for frame context (`required`) and leave it out of one that does not (None, and why)."""
    try:
        rows = index.rows(oof_ids, oof_fold, test_ids)
    except FoldsNotGrouped as e:
        if required:
            raise
        return None, f"frame context is left out of the options: {e}"
    return rows, NOTHING_TO_USE if rows.nothing_to_use else ""


def _int64(a: np.ndarray) -> np.ndarray:
    """Integer ids as int64, so a key does not depend on the dtype pandas happened to read them with."""
    return a.astype(np.int64) if a.dtype.kind in "iub" else a


@dataclass(frozen=True, eq=False)
class FrameRows:
    """The siblings of a model set's out-of-fold rows (train frames) and of its test rows (test frames, placeholders
    with `prior`), and a content key of the out-of-fold rows' frames and folds (what a cached fit depends on)."""

    oof: Siblings
    test: Siblings
    prior: np.ndarray
    key: str

    @property
    def nothing_to_use(self) -> bool:
        return not (self.oof.any or self.test.any)


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FrameParams:
    """b per sibling-count bucket (bucket k: edges[k] <= siblings < edges[k + 1]) and eps; b all 0 changes nothing."""

    b: tuple[float, ...] = (0.0,)
    eps: float = 1.0
    edges: tuple[int, ...] = EDGES

    @property
    def identity(self) -> bool:
        return not any(self.b)

    def to_list(self) -> list[float]:
        return [*self.b, self.eps, *map(float, self.edges)]

    @classmethod
    def from_list(cls, v: Sequence[float]) -> "FrameParams":
        k = (len(v) - 1) // 2
        return cls(tuple(float(x) for x in v[:k]), float(v[k]), tuple(int(x) for x in v[k + 1:]))

    def describe(self) -> str:
        return "b " + "/".join(f"{x:.3g}" for x in self.b) + f", eps {self.eps:.3g}"


def buckets(count: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Each row's bucket by sibling count (-1: no sibling, left unchanged)."""
    return np.searchsorted(np.asarray(edges), np.asarray(count), side="right") - 1


def adjust(probs: np.ndarray, sib: Siblings, params: FrameParams, prior: np.ndarray | None = None,
           source: np.ndarray | None = None) -> np.ndarray:
    """q with log q = log p + b log(eps + siblings' mean), renormalised; rows without siblings (and every row when b = 0)
    come back bit for bit. `source`: the distributions the siblings carry (default `probs`; a second pass passes q)."""
    p = np.array(probs, dtype=np.float64, copy=True)
    k = buckets(sib.count, params.edges)
    b = np.where(k >= 0, np.asarray(params.b + (0.0,))[k], 0.0)
    rows = b > 0
    if not rows.any():
        return p
    mean = sibling_mean(p if source is None else source, sib, prior)[rows]
    z = np.log(np.clip(p[rows], EPS, None)) + b[rows, None] * np.log(params.eps + mean)
    z -= z.max(1, keepdims=True)
    q = np.exp(z)
    p[rows] = q / q.sum(1, keepdims=True)
    return p


def _loss_and_grad(x: np.ndarray, logp: np.ndarray, mean: np.ndarray, y: np.ndarray, k: np.ndarray, n_b: int
                   ) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood of q over the rows with siblings, and its gradient in (b_1..b_K, log eps).

    The (rows, concepts) arrays are float32 (exp and log there cost most of a fit; float32 halves it); the means over
    rows are taken in float64. The gradient matches finite differences (tests/test_frame_context.py).
    """
    b, eps = x[:n_b], float(np.exp(x[n_b]))
    rows = np.arange(len(y))
    t = mean + np.float32(eps)
    lm = np.log(t)
    np.reciprocal(t, out=t)  # t is 1 / (eps + m) from here
    q = lm * (b[k].astype(np.float32)[:, None] if n_b > 1 else np.float32(b[0]))
    q += logp
    q -= q.max(1, keepdims=True)
    s_y = q[rows, y].astype(np.float64)
    np.exp(q, out=q)
    z = q.sum(1).astype(np.float64)
    loss = float(np.mean(np.log(z) - s_y))
    e_lm = np.einsum("nc,nc->n", q, lm) / z  # E_q[log(eps + m)]
    e_t = np.einsum("nc,nc->n", q, t) / z  # E_q[1 / (eps + m)]
    grad_b = np.bincount(k, weights=e_lm - lm[rows, y], minlength=n_b) / len(y)
    d_eps = -(b[k] * eps) * (t[rows, y] - e_t)
    return loss, np.append(grad_b, d_eps.mean())


def fit(probs: np.ndarray, labels: np.ndarray, sib: Siblings, prior: np.ndarray | None = None,
        edges: Sequence[int] = EDGES, source: np.ndarray | None = None) -> FrameParams:
    """b (one per bucket of `edges`) and eps minimising the log loss of `adjust` on these rows: out-of-fold rows only,
    never test rows. SLSQP from the best of a few starts of eps; b = 0 (unchanged) unless the fit is strictly better.
    `source`: what the siblings carry (a second pass: the first pass's q)."""
    from scipy.optimize import minimize

    edges = tuple(int(e) for e in edges)
    n_b = len(edges)
    none = FrameParams((0.0,) * n_b, 1.0, edges)
    k = buckets(sib.count, edges)
    rows = k >= 0
    if not rows.any():
        return none
    p = np.asarray(probs, dtype=np.float64)
    mean = sibling_mean(p if source is None else source, sib, prior)[rows]
    args = (np.log(np.clip(p[rows], EPS, None)).astype(np.float32), mean.astype(np.float32), np.asarray(labels, dtype=np.int64)[rows],
            k[rows], n_b)
    base = _loss_and_grad(np.zeros(n_b + 1), *args)[0]  # b = 0: the rows as they are
    starts = [np.append(np.ones(n_b), np.log(e)) for e in STARTS]  # the loss is not convex in eps: start at the best of a few
    x0 = min(starts, key=lambda x: _loss_and_grad(x, *args)[0])
    # SLSQP, as lib.decide.weights: L-BFGS-B reached the same optima but its tiny BLAS calls cost milliseconds each under
    # a threaded OpenBLAS, six times the whole fit on the demo's rows.
    res = minimize(_loss_and_grad, x0, args=args, jac=True, method="SLSQP", bounds=[(0.0, B_MAX)] * n_b + [LOG_EPS_BOUNDS],
                   options={"maxiter": 200})
    x, f = min(((res.x, float(res.fun)), (x0, _loss_and_grad(x0, *args)[0])), key=lambda xf: xf[1])
    if not f < base - 1e-9:
        return none
    return FrameParams(tuple(float(v) for v in x[:n_b]), float(np.exp(x[n_b])), edges)


def nested(probs: np.ndarray, labels: np.ndarray, sib: Siblings, fold: np.ndarray, edges: Sequence[int] = EDGES,
           passes: int = 1) -> np.ndarray:
    """Out-of-fold rows adjusted honestly: fold k's rows by parameters fitted on the other folds' rows only.

    Folds grouped by frame keep every sibling of a held-out row in its fold. `passes` 2 feeds the first pass's
    adjusted distributions to the siblings of a second pass (fitted the same way)."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    out = p.copy()
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        s_tr, s_te = sib.subset(tr), sib.subset(te)
        src_tr, src_te = p[tr], p[te]
        for _ in range(passes):
            params = fit(p[tr], y[tr], s_tr, edges=edges, source=src_tr)
            src_tr, src_te = adjust(p[tr], s_tr, params, source=src_tr), adjust(p[te], s_te, params, source=src_te)
        out[te] = src_te
    return out

