"""Every loss against its formula, written here independently in numpy, plus the identities that tie
the long-tail and taxonomy-aware losses back to plain cross-entropy."""
import math
import typing
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.config import ConfigError, LossCfg, LossName, load_config
from lib.model.losses import CrossEntropyExpectedDistance, TaxonomySmoothing, WeightedLoss, build_loss, effective_number_weights

B, C = 6, 5
COUNTS = np.array([100, 30, 10, 3, 0])
NAMES = typing.get_args(typing.get_type_hints(LossCfg)["name"])


def _distance() -> np.ndarray:
    rng = np.random.default_rng(1)
    d = rng.integers(1, 13, size=(C, C)).astype(np.float64)
    d = np.triu(d, 1)
    return d + d.T


D = _distance()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(B, C, generator=g)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    return logits, target


def make(name: LossName, counts: np.ndarray = COUNTS, distance: np.ndarray = D, **kw) -> WeightedLoss:
    """The loss over the test's own distance matrix D (so taxonomy smoothing spreads by D: ts_distance metric)."""
    if name == "taxonomy_smoothing":
        kw.setdefault("ts_distance", "metric")
    return build_loss(LossCfg(name=name, **kw), counts, distance)


def value(loss: WeightedLoss, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    return float(loss(logits, target, weight))


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray, ls: float = 0.0) -> np.ndarray:
    logp = np_log_softmax(z)
    nll = -logp[np.arange(len(y)), y]
    return (1 - ls) * nll + ls * (-logp.mean(1))


def np_effective(counts: np.ndarray, beta: float) -> np.ndarray:
    n = np.maximum(counts, 1).astype(np.float64)
    w = (1 - beta) / (1 - beta**n)
    return w / w.sum() * len(n)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def as_np(logits: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return logits.double().numpy(), target.numpy()


def assert_value_and_grad(loss: WeightedLoss, reference, logits: torch.Tensor, target: torch.Tensor) -> None:
    """The loss and its gradient in the logits equal the reference's (float32, to 1e-5)."""
    a = logits.detach().clone().requires_grad_(True)
    b = logits.detach().clone().requires_grad_(True)
    got, ref = loss(a, target), reference(b)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- each loss vs its formula


def test_ce_with_label_smoothing(batch):
    z, y = as_np(*batch)
    assert value(make("ce", label_smoothing=0.1), *batch) == pytest.approx(np_ce(z, y, 0.1).mean(), rel=1e-5)


def test_weighted_ce_inverse_frequency(batch):
    """The weighted mean sum(w_y l) / sum(w_y), not the class-weighted sum over N."""
    z, y = as_np(*batch)
    w = 1.0 / np.array([100, 30, 10, 3, 1.0])  # the empty class counts as 1
    w = w / w.mean()
    assert value(make("weighted_ce"), *batch) == pytest.approx((w[y] * np_ce(z, y)).sum() / w[y].sum(), rel=1e-5)
    s = torch.tensor([0.2, 1.0, 0.5, 0.7, 0.1, 0.9])  # pseudo-label weights multiply the class weights
    ref = (s.numpy() * w[y] * np_ce(z, y)).sum() / (s.numpy() * w[y]).sum()
    logits, target = batch
    assert value(make("weighted_ce"), logits, target, s) == pytest.approx(ref, rel=1e-5)


def test_weighted_ce_value_and_gradient_match_torch_weighted_cross_entropy(batch):
    """Reference: PyTorch's F.cross_entropy(weight=w), mean reduction (sum of w_y l over sum of w_y)."""
    logits, target = batch
    w = torch.as_tensor(1.0 / np.maximum(COUNTS, 1), dtype=torch.float32)
    w = w / w.mean()
    assert_value_and_grad(make("weighted_ce"), lambda z: F.cross_entropy(z, target, weight=w), logits, target)


def test_focal(batch):
    z, y = as_np(*batch)
    p_t = np.exp(np_log_softmax(z))[np.arange(B), y]
    ref = -((1 - p_t) ** 2) * np.log(p_t)
    assert value(make("focal", gamma=2.0), *batch) == pytest.approx(ref.mean(), rel=1e-5)
    w = np_effective(COUNTS, 0.99)
    got = value(make("focal", gamma=2.0, beta=0.99, focal_class_weights=True), *batch)
    assert got == pytest.approx((w[y] * ref).mean(), rel=1e-5)


def test_focal_gamma_zero_is_ce(batch):
    assert value(make("focal", gamma=0.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_class_balanced_softmax(batch):
    z, y = as_np(*batch)
    w = np_effective(COUNTS, 0.99)
    assert value(make("class_balanced", beta=0.99), *batch) == pytest.approx((w[y] * np_ce(z, y)).mean(), rel=1e-5)


def test_class_balanced_sigmoid(batch):
    z, y = as_np(*batch)
    w = np_effective(COUNTS, 0.99)
    onehot = np.eye(C)[y]
    p = np_sigmoid(z)
    bce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    got = value(make("class_balanced", cb_base="sigmoid", beta=0.99), *batch)
    assert got == pytest.approx((w[y] * bce.sum(1)).mean(), rel=1e-5)
    p_t = np.where(onehot == 1, p, 1 - p)
    focal = ((1 - p_t) ** 1.5 * bce).sum(1)
    got = value(make("class_balanced", cb_base="focal", beta=0.99, gamma=1.5), *batch)
    assert got == pytest.approx((w[y] * focal).mean(), rel=1e-5)


def test_class_balanced_beta_zero_is_uniform(batch):
    np.testing.assert_allclose(effective_number_weights(COUNTS, 0.0), np.ones(C))
    assert value(make("class_balanced", beta=0.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_balanced_softmax(batch):
    z, y = as_np(*batch)
    prior = np.maximum(COUNTS, 1) / np.maximum(COUNTS, 1).sum()
    assert value(make("balanced_softmax"), *batch) == pytest.approx(np_ce(z + np.log(prior), y).mean(), rel=1e-5)
    equal = make("balanced_softmax", counts=np.full(C, 7))
    assert value(equal, *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_logit_adjusted(batch):
    z, y = as_np(*batch)
    prior = np.maximum(COUNTS, 1) / np.maximum(COUNTS, 1).sum()
    got = value(make("logit_adjusted", tau=0.5), *batch)
    assert got == pytest.approx(np_ce(z + 0.5 * np.log(prior), y).mean(), rel=1e-5)
    assert value(make("logit_adjusted", tau=0.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_ldam(batch):
    z, y = as_np(*batch)
    m = 1 / np.maximum(COUNTS, 1) ** 0.25
    m = m * 0.5 / m.max()
    adjusted = z - np.eye(C)[y] * m[y][:, None]
    got = value(make("ldam", max_m=0.5, s=30.0), *batch)
    assert got == pytest.approx(np_ce(30.0 * adjusted, y).mean(), rel=1e-5)


def ldam_reference(z: torch.Tensor, y: torch.Tensor, counts: np.ndarray, max_m: float, s: float,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """LDAMLoss.forward of kaidic/LDAM-DRW (losses.py), written here: m_c = n_c^-1/4 scaled to max_m,
    the margin subtracted from the true logit only, then F.cross_entropy(s * x_m, y, weight=per_cls_weights)."""
    m = 1.0 / np.sqrt(np.sqrt(np.maximum(counts, 1).astype(np.float64)))
    m = torch.as_tensor(m * (max_m / m.max()), dtype=torch.float32)
    is_target = F.one_hot(y, z.shape[1]).bool()
    x_m = torch.where(is_target, z - m[y][:, None], z)
    return F.cross_entropy(s * x_m, y, weight=weight)


def test_ldam_drw_value_and_gradient_match_the_authors_code(batch):
    """Reference: kaidic/LDAM-DRW losses.py LDAMLoss with DRW per_cls_weights (cifar_train.py), on cosine logits."""
    logits, target = batch
    cosine = torch.tanh(logits)  # logits in [-1, 1], as NormedLinear gives
    loss = make("ldam", max_m=0.5, s=30.0, beta=0.999, drw_start_epoch=1)
    loss.set_epoch(0)
    assert_value_and_grad(loss, lambda z: ldam_reference(z, target, COUNTS, 0.5, 30.0, None), cosine, target)
    loss.set_epoch(1)
    w = torch.as_tensor(np_effective(COUNTS, 0.999), dtype=torch.float32)
    assert_value_and_grad(loss, lambda z: ldam_reference(z, target, COUNTS, 0.5, 30.0, w), cosine, target)


def test_ldam_without_margin_is_ce(batch):
    assert value(make("ldam", max_m=1e-12, s=1.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_ldam_drw_switches_on_at_start_epoch(batch):
    z, y = as_np(*batch)
    loss = make("ldam", max_m=1e-12, s=1.0, beta=0.99, drw_start_epoch=2)
    ce = np_ce(z, y)
    for epoch, weighted in ((0, False), (1, False), (2, True), (5, True)):
        loss.set_epoch(epoch)
        w = np_effective(COUNTS, 0.99) if weighted else np.ones(C)
        assert value(loss, *batch) == pytest.approx((w[y] * ce).sum() / w[y].sum(), rel=1e-5), epoch
    never = make("ldam", max_m=1e-12, s=1.0, drw_start_epoch=-1)
    never.set_epoch(100)
    assert value(never, *batch) == pytest.approx(ce.mean(), rel=1e-5)


def test_seql_always_suppressing(batch):
    """gamma 1 makes the draw certain: every tail class other than the label leaves the normaliser."""
    z, y = as_np(*batch)
    tail = COUNTS / COUNTS.sum() < 0.05  # classes 3 and 4
    ref = []
    for i in range(B):
        keep = ~tail | (np.arange(C) == y[i])
        ref.append(np.log(np.exp(z[i][keep]).sum()) - z[i, y[i]])
    got = value(make("seql", seql_gamma=1.0, seql_lambda=0.05), *batch)
    assert got == pytest.approx(np.mean(ref), rel=1e-5)


def test_seql_identities_and_reproducibility(batch):
    ce = value(make("ce"), *batch)
    assert value(make("seql", seql_gamma=0.0, seql_lambda=0.05), *batch) == pytest.approx(ce, rel=1e-6)
    assert value(make("seql", seql_gamma=1.0, seql_lambda=0.0), *batch) == pytest.approx(ce, rel=1e-6)
    loss = make("seql", seql_gamma=0.5, seql_lambda=0.05)
    torch.manual_seed(3)
    a = loss.per_sample(*batch)
    torch.manual_seed(3)
    b = loss.per_sample(*batch)
    torch.testing.assert_close(a, b)
    full = make("seql", seql_gamma=1.0, seql_lambda=0.05).per_sample(*batch)
    plain = make("ce").per_sample(*batch)
    assert bool(((a >= full - 1e-6) & (a <= plain + 1e-6)).all())  # suppression only removes terms


def test_dwce_by_hand():
    """Equal logits: p = 1/3. Row 0 of D + I is [1, 1, 2] / 4."""
    d = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=np.float64)
    loss = make("dwce", counts=np.ones(3), distance=d)
    got = value(loss, torch.zeros(1, 3), torch.tensor([0]))
    by_hand = -(1 / 4 * math.log(1 / 3) + 1 / 4 * math.log(2 / 3) + 2 / 4 * math.log(2 / 3))
    assert got == pytest.approx(by_hand, rel=1e-6)


def test_dwce(batch):
    z, y = as_np(*batch)
    cost = D + np.eye(C)
    cost = cost / cost.sum(1, keepdims=True)
    p = np.exp(np_log_softmax(z))
    ref = []
    for i in range(B):
        t = cost[y[i], y[i]] * np.log(p[i, y[i]])
        t += sum(cost[y[i], j] * np.log(1 - p[i, j]) for j in range(C) if j != y[i])
        ref.append(-t)
    assert value(make("dwce"), *batch) == pytest.approx(np.mean(ref), rel=1e-5)


def test_dwce_confident_mistake_is_finite():
    logits = torch.tensor([[0.0, 200.0, 0.0]], requires_grad=True)
    loss = make("dwce", counts=np.ones(3), distance=np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=np.float64))
    out = loss(logits, torch.tensor([0]))
    out.backward()
    assert logits.grad is not None
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all() and logits.grad[0, 1] > 0


def test_taxonomy_smoothing(batch):
    z, y = as_np(*batch)
    q = np.zeros((B, C))
    for i in range(B):
        a = np.exp(-0.5 * D[y[i]])
        a[y[i]] = 0
        q[i] = 0.2 * a / a.sum()
        q[i, y[i]] = 0.8
    ref = -(q * np_log_softmax(z)).sum(1)
    assert value(make("taxonomy_smoothing", alpha=0.2, ts_beta=0.5), *batch) == pytest.approx(ref.mean(), rel=1e-5)
    assert value(make("taxonomy_smoothing", alpha=0.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


def test_ce_expected_distance(batch):
    z, y = as_np(*batch)
    p = np.exp(np_log_softmax(z))
    expected = (p * D[y]).sum(1)
    loss = make("ce_expected_distance", ed_lambda=0.3, label_smoothing=0.1)
    assert isinstance(loss, CrossEntropyExpectedDistance)
    np.testing.assert_allclose(loss.expected_distance(*batch).numpy(), expected, rtol=1e-5)
    assert value(loss, *batch) == pytest.approx((np_ce(z, y, 0.1) + 0.3 * expected).mean(), rel=1e-5)
    assert value(make("ce_expected_distance", ed_lambda=0.0), *batch) == pytest.approx(value(make("ce"), *batch), rel=1e-6)


# ----------------------------------------------------------------------------- every loss through the factory

# seql with gamma 1 is deterministic, so sample-weight comparisons do not depend on the random draw
DETERMINISTIC: dict[str, dict[str, Any]] = {"seql": {"seql_gamma": 1.0, "seql_lambda": 0.05}}


@pytest.mark.parametrize("name", NAMES)
def test_sample_weights(name, batch):
    logits, target = batch
    loss = make(name, **DETERMINISTIC.get(name, {}))
    alone = value(loss, logits[:1], target[:1])
    one_hot_weight = torch.tensor([1.0] + [0.0] * (B - 1))
    assert value(loss, logits, target, one_hot_weight) == pytest.approx(alone, rel=1e-5)
    assert value(loss, logits, target, torch.full((B,), 0.3)) == pytest.approx(value(loss, logits, target), rel=1e-5)


CASES: list[tuple[str, dict[str, Any]]] = [(n, {}) for n in NAMES] + [
    ("focal", {"focal_class_weights": True}), ("class_balanced", {"cb_base": "sigmoid"}),
    ("class_balanced", {"cb_base": "focal"}), ("ldam", {"drw_start_epoch": 0}),
]


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}-{'-'.join(map(str, e.values()))}" for n, e in CASES])
def test_builds_finite_and_backpropagates(name, extra, batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    loss = make(name, **extra)
    loss.set_epoch(1)
    out = loss(logits, target, torch.rand(B) + 0.1)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logits(name, batch):
    logits, target = batch
    loss = make(name, **DETERMINISTIC.get(name, {}))
    low = logits.to(torch.bfloat16)
    out = loss(low, target)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(value(loss, low.float(), target), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_tables_are_buffers(name):
    """Per-class tensors must be buffers (or `.to(device)` would leave them behind)."""
    loss = make(name)
    assert not [k for k, v in vars(loss).items() if isinstance(v, torch.Tensor)]
    assert all(b.dtype in (torch.float32, torch.bool) for b in loss.buffers())


def test_unknown_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'focal'"):
        load_config(None, ["loss.name=focall"])


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="same taxonomy"):
        build_loss(LossCfg(), COUNTS, np.zeros((3, 3)))


def test_lca_distance_by_hand():
    """linnaeus' distance: 2 x (ranks below the lowest common ancestor), every concept a leaf under the 7 ranks."""
    from lib.data.taxonomy import Taxonomy

    k = "K"
    tax = Taxonomy(names=("a", "b", "g", "x"), lineages=(
        (k, "P", "C", "O", "F", "G", "G a"), (k, "P", "C", "O", "F", "G", "G b"),
        (k, "P", "C", "O", "F", "G", None), (k, "Q", None, None, None, None, None)))
    lca = tax.lca_distance_matrix()
    expected = np.array([[0, 2, 2, 12], [2, 0, 2, 12], [2, 2, 0, 12], [12, 12, 12, 0]])
    np.testing.assert_array_equal(lca, expected)
    assert tax.distance_matrix()[0, 2] == 1  # the metric: a genus-level concept is 1 from its species
    loss = build_loss(LossCfg(name="taxonomy_smoothing", ts_distance="lca", alpha=0.2, ts_beta=0.5), np.ones(4),
                      tax.distance_matrix(), lca)
    assert isinstance(loss, TaxonomySmoothing)
    a = np.exp(-0.5 * expected[0].astype(float))
    a[0] = 0
    np.testing.assert_allclose(loss.soft_target[0].numpy(), np.r_[0.8, 0.2 * a[1:] / a.sum()], rtol=1e-6)
    with pytest.raises(ValueError, match="lca_distance"):
        build_loss(LossCfg(name="taxonomy_smoothing", ts_distance="lca"), np.ones(4), tax.distance_matrix())


# ----------------------------------------------------------------------------- value and gradient against written-out references
# Each reference is the formula of the source named beside it, written here in float64 torch so autograd gives its
# gradient; the project's float32 loss must match value and gradient in the logits to 1e-5.


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def _ref_focal(z, y, gamma, w=None):  # Lin et al. 2017 (ICCV), eq. 5 with the class weight alpha_t; mean over the batch
    logp = z.log_softmax(1).gather(1, y[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    return (loss if w is None else w[y] * loss).mean()


def _ref_cb_sigmoid(z, y, w, gamma):  # Cui et al. 2019, class-balanced-loss (TF) focal_loss / sigmoid: sum over classes, / N
    onehot = F.one_hot(y, z.shape[1]).double()
    p = z.sigmoid()
    bce = -(onehot * p.log() + (1 - onehot) * (1 - p).log())
    p_t = torch.where(onehot == 1, p, 1 - p)
    return (w[y] * ((1 - p_t) ** gamma * bce).sum(1)).mean()


def _ref_seql_all(z, y, tail):  # Tan et al. 2020 softmax EQL with every tail negative dropped (gamma 1)
    keep = (~tail)[None, :] | F.one_hot(y, z.shape[1]).bool()
    return (torch.logsumexp(z.masked_fill(~keep, float("-inf")), 1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def _ref_dwce(z, y, d):  # 3rd place FathomNet 2025: -(c_yy log p_y + sum_j c_yj log(1 - p_j)), c = (D + I) row-normalised
    cost = _t(d) + torch.eye(len(d), dtype=torch.float64)
    cost = cost / cost.sum(1, keepdim=True)
    p = z.softmax(1)
    onehot = F.one_hot(y, z.shape[1]).bool()
    return -(cost[y] * torch.where(onehot, p.log(), (1 - p).log())).sum(1).mean()


def _ref_ts(z, y, d, alpha, beta):  # Bertinetto et al. 2020 soft labels: (1 - alpha) on y, alpha by exp(-beta D) elsewhere
    a = torch.exp(-beta * _t(d)).fill_diagonal_(0.0)
    q = (1 - alpha) * torch.eye(len(d), dtype=torch.float64) + alpha * a / a.sum(1, keepdim=True)
    return -(q[y] * z.log_softmax(1)).sum(1).mean()


def _ref_ced(z, y, d, lam):  # 2nd place FathomNet 2025: CE + lambda sum_j p_j D[y, j]
    return (F.cross_entropy(z, y, reduction="none") + lam * (z.softmax(1) * _t(d)[y]).sum(1)).mean()


PRIOR = np.log(np.maximum(COUNTS, 1) / np.maximum(COUNTS, 1).sum())
REFERENCES: dict[str, tuple[dict[str, Any], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {  # loss keywords, formula
    "ce": ({"label_smoothing": 0.1}, lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)),
    "focal": ({"gamma": 2.0, "beta": 0.99, "focal_class_weights": True}, lambda z, y: _ref_focal(z, y, 2.0, _t(np_effective(COUNTS, 0.99)))),
    "class_balanced": ({"beta": 0.99},  # softmax base: Cui et al.'s code weights each sample and divides by N
                       lambda z, y: (_t(np_effective(COUNTS, 0.99))[y] * F.cross_entropy(z, y, reduction="none")).mean()),
    "class_balanced-focal": ({"beta": 0.99, "cb_base": "focal", "gamma": 1.5},
                             lambda z, y: _ref_cb_sigmoid(z, y, _t(np_effective(COUNTS, 0.99)), 1.5)),
    "balanced_softmax": ({}, lambda z, y: F.cross_entropy(z + _t(PRIOR), y)),  # Ren et al. 2020: logits + log prior
    "logit_adjusted": ({"tau": 0.5}, lambda z, y: F.cross_entropy(z + 0.5 * _t(PRIOR), y)),  # Menon et al. 2021, loss form
    "seql": ({"seql_gamma": 1.0, "seql_lambda": 0.05}, lambda z, y: _ref_seql_all(z, y, torch.as_tensor(COUNTS / COUNTS.sum() < 0.05))),
    "dwce": ({}, lambda z, y: _ref_dwce(z, y, D)),
    "taxonomy_smoothing": ({"alpha": 0.2, "ts_beta": 0.5}, lambda z, y: _ref_ts(z, y, D, 0.2, 0.5)),
    "ce_expected_distance": ({"ed_lambda": 0.3}, lambda z, y: _ref_ced(z, y, D, 0.3)),
}


@pytest.mark.parametrize("key", list(REFERENCES))
def test_value_and_gradient_match_the_reference(key, batch):
    logits, target = batch
    kw, ref = REFERENCES[key]
    loss = make(key.split("-")[0], **kw)
    a = logits.detach().clone().requires_grad_(True)
    b = logits.detach().double().requires_grad_(True)
    got, want = loss(a, target), ref(b, target)
    got.backward()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
