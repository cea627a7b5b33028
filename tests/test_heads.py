"""Classifier heads: shapes, losses and gradients, and the taxonomy-aware behaviour of each head."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.config import ConfigError, HeadCfg, HeadName, LossCfg, load_config
from lib.data.taxonomy import Taxonomy, load_taxonomy_csv
from lib.model.head_base import HeadOutput, NormedLinear, split_ranks
from lib.model.heads import MLPHead, MultiHead, PerRankHead, TwoLevelHead, build_head
from lib.model.losses import build_loss
from lib.model.tree_heads import CoherentHead, ConditionalHead, HierarchicalSoftmaxHead, max_constraint, mc_loss, taxonomy_levels, taxonomy_nodes

NAMES: list[HeadName] = ["linear", "mlp", "multi", "per_rank", "two_level", "hierarchical_softmax", "conditional", "coherent"]
IN = 16


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return load_taxonomy_csv("configs/taxonomy/fathomnet2025.csv")


@pytest.fixture(scope="module")
def ce(tax):
    return build_loss(LossCfg(), np.ones(tax.n_classes), tax.distance_matrix())


def toy() -> Taxonomy:
    """2 phyla, 3 classes, 5 leaves at mixed depths (order, order, class, order, phylum)."""
    k = "K"
    return Taxonomy(
        names=("L1", "L2", "L3", "L4", "L5"),
        lineages=(
            (k, "P1", "C1", "O1", None, None, None),
            (k, "P1", "C1", "O2", None, None, None),
            (k, "P1", "C2", None, None, None, None),
            (k, "P2", "C3", "O3", None, None, None),
            (k, "P2", None, None, None, None, None),
        ),
    )


def zero_(head: nn.Module) -> None:
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()


def level_fc(head: HierarchicalSoftmaxHead, i: int) -> nn.Linear:
    """The Linear classifier of level `i` (an item of an nn.ModuleList, which types it as any Module)."""
    fc = head.classifiers[i]
    assert isinstance(fc, nn.Linear)
    return fc


def targets(tax: Taxonomy) -> torch.Tensor:
    """A species-level concept, a genus-level one, Actinopterygii (phylum only) and another species."""
    species = [i for i, lin in enumerate(tax.lineages) if lin[-1] is not None]
    genus = next(i for i, lin in enumerate(tax.lineages) if lin[-1] is None and lin[-2] is not None)
    return torch.tensor([species[0], genus, tax.index("Actinopterygii"), species[1]])


def cfg(name: HeadName, **kw) -> HeadCfg:
    return HeadCfg(name=name, **kw)


# ----------------------------------------------------------------------------- every head


@pytest.mark.parametrize("name", NAMES)
def test_shapes(tax, name):
    torch.manual_seed(0)
    head = build_head(cfg(name), IN, tax)
    out = head(torch.randn(4, IN))
    assert isinstance(out, HeadOutput) and out.logits.shape == (4, 79) and out.logits.dtype == torch.float32
    probs = head.probs(out)
    assert probs.shape == (4, 79) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    ranks = split_ranks(tax)
    if name == "multi":
        assert out.heads is not None and out.heads.shape == (8, 4, 79)
    elif name == "per_rank":
        assert {r: v.shape[1] for r, v in out.aux.items()} == {r: len(tax.rank_labels(r)[1]) for r in ranks}
    elif name == "two_level":
        assert out.aux["coarse"].shape == (4, len(tax.rank_labels("order")[1]))
    elif name in ("hierarchical_softmax", "conditional"):
        assert isinstance(head, HierarchicalSoftmaxHead)  # ConditionalHead is one too
        assert list(out.aux) == ranks
        assert [v.shape[1] for v in out.aux.values()] == [len(lv.nodes) for lv in head.levels[:-1]]
    elif name == "coherent":
        assert isinstance(head, CoherentHead)
        assert list(out.aux) == ["nodes"] and out.aux["nodes"].shape == (4, len(head.nodes.names))
    else:
        assert out.aux == {} and out.heads is None


@pytest.mark.parametrize("name,kw", [(n, {}) for n in NAMES] + [("conditional", {"routing": "hard"}), ("conditional", {"routing": "gumbel"})],
                         ids=NAMES + ["conditional-hard", "conditional-gumbel"])
def test_loss_backpropagates(tax, ce, name, kw):
    torch.manual_seed(0)
    head = build_head(cfg(name, **kw), IN, tax).train()
    feats = torch.randn(4, IN, requires_grad=True)
    loss = head.loss(head(feats), targets(tax), torch.tensor([1.0, 0.5, 2.0, 1.0]), ce)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["per_rank", "hierarchical_softmax", "conditional"])
@pytest.mark.parametrize("loss_name", ["focal", "ldam", "seql", "taxonomy_smoothing", "ce_expected_distance"])
def test_any_base_loss(tax, name, loss_name):
    counts = np.arange(1, tax.n_classes + 1)
    base = build_loss(LossCfg(name=loss_name), counts, tax.distance_matrix(), tax.lca_distance_matrix())
    head = build_head(cfg(name), IN, tax)
    loss = head.loss(head(torch.randn(4, IN)), targets(tax), None, base)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_features_give_float32(tax, name):
    head = build_head(cfg(name), IN, tax).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, IN).bfloat16())
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert all(v.dtype == torch.float32 for v in out.aux.values())


def test_unknown_head_raises(tax):
    with pytest.raises(ValueError, match="Unknown head"):
        build_head(HeadCfg(name="nope"), IN, tax)  # type: ignore[arg-type]  # an unknown head on purpose: build_head must refuse it


# ----------------------------------------------------------------------------- flat heads


def test_linear_loss_is_base_loss(tax, ce):
    head = build_head(cfg("linear"), IN, tax)
    out, t, w = head(torch.randn(4, IN)), targets(tax), torch.tensor([1.0, 2.0, 0.5, 1.0])
    assert torch.equal(head.loss(out, t, w, ce), ce(out.logits, t, w))


def test_multi_mean_and_loss(tax, ce):
    head = build_head(cfg("multi", n_heads=3), IN, tax)
    assert isinstance(head, MultiHead) and len(head.fcs) == 3
    out, t = head(torch.randn(4, IN)), targets(tax)
    assert out.heads.shape == (3, 4, 79)
    assert not torch.allclose(out.heads[0], out.heads[1])  # independently initialised
    assert torch.allclose(out.logits, out.heads.mean(0))
    expected = sum(ce(out.heads[h], t) for h in range(3)) / 3
    assert torch.allclose(head.loss(out, t, None, ce), expected)
    assert head.head_probs(out).shape == (3, 4, 79)


def test_mlp_layers_and_init(tax):
    head = build_head(cfg("mlp", hidden=32, dropout=0.25), IN, tax)
    assert isinstance(head, MLPHead)
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout, nn.Linear]
    first, last = head.net[0], head.net[4]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features, last.out_features) == (IN, 32, 79)
    assert head.net[3].p == 0.25
    for lin in (first, last):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # xavier_uniform
        default = 1.0 / math.sqrt(lin.in_features)  # nn.Linear's own init bound
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > default
        assert torch.count_nonzero(lin.bias) == 0


# ----------------------------------------------------------------------------- per_rank


def manual_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    valid = labels >= 0
    nll = -F.log_softmax(logits[valid], -1).gather(1, labels[valid, None]).squeeze(1)
    return (nll * weight[valid]).sum() / weight[valid].sum()


def test_per_rank_aux_heads_and_ignored_labels(tax, ce):
    head = build_head(cfg("per_rank", aux_weight=0.7), IN, tax)
    assert isinstance(head, PerRankHead)
    ranks = [r for r in ("kingdom", "phylum", "class", "order", "family", "genus", "species") if len(tax.rank_labels(r)[1]) >= 2]
    assert head.ranks == ranks and len(head.rank_fcs) == len(ranks) == 6 and "kingdom" not in head.rank_fcs
    out, t, w = head(torch.randn(4, IN)), targets(tax), torch.tensor([1.0, 2.0, 0.5, 3.0])
    species = torch.as_tensor(tax.rank_labels("species")[0])[t]
    assert species.tolist()[1:3] == [-1, -1] and (species[[0, 3]] >= 0).all()
    aux = [manual_ce(out.aux[r], torch.as_tensor(tax.rank_labels(r)[0])[t], w) for r in ranks]
    expected = ce(out.logits, t, w) + 0.7 * torch.stack(aux).mean()
    assert torch.allclose(head.loss(out, t, w, ce), expected)
    # the samples without a species cannot move the species term
    moved = HeadOutput(out.logits, {**out.aux, "species": out.aux["species"].clone()})
    moved.aux["species"][1:3] += 5 * torch.randn(2, moved.aux["species"].shape[1])
    assert torch.allclose(head.loss(moved, t, w, ce), head.loss(out, t, w, ce))


def test_per_rank_aux_weight_zero_is_base(tax, ce):
    head = build_head(cfg("per_rank", aux_weight=0.0), IN, tax)
    out, t = head(torch.randn(4, IN)), targets(tax)
    assert torch.equal(head.loss(out, t, None, ce), ce(out.logits, t, None))


def test_per_rank_rank_absent_from_batch_is_skipped(tax, ce):
    head = build_head(cfg("per_rank"), IN, tax)
    t = torch.tensor([tax.index("Actinopterygii")] * 2)  # a phylum only: only the phylum term exists
    out = head(torch.randn(2, IN))
    phylum = F.cross_entropy(out.aux["phylum"], torch.as_tensor(tax.rank_labels("phylum")[0])[t])
    assert torch.allclose(head.loss(out, t, None, ce), ce(out.logits, t) + phylum)


# ----------------------------------------------------------------------------- the tree


def test_toy_levels():
    levels = taxonomy_levels(toy())
    assert [lv.name for lv in levels] == ["phylum", "class", "order", "leaf"]
    assert levels[1].nodes == ("C1", "C2", "C3", "P2 (no class)")
    assert levels[2].nodes == ("O1", "O2", "O3", "C2 (no order)", "P2 (no order)")
    parents = [[levels[i - 1].nodes[p] for p in levels[i].parent] for i in (1, 2, 3)]
    assert parents == [["P1", "P1", "P2", "P2"], ["C1", "C1", "C3", "C2", "P2 (no class)"],
                       ["O1", "O2", "C2 (no order)", "O3", "P2 (no order)"]]
    assert [levels[1].nodes[i] for i in levels[1].of_concept] == ["C1", "C1", "C2", "C3", "P2 (no class)"]


def test_real_levels_agree_with_rank_labels(tax):
    levels = taxonomy_levels(tax)
    assert [lv.name for lv in levels] == split_ranks(tax) + ["leaf"]
    for lv in levels[:-1]:
        labels, values = tax.rank_labels(lv.name)
        assert lv.nodes[: len(values)] == tuple(values)  # real values first, in rank_labels order
        assert np.array_equal(lv.of_concept[labels >= 0], labels[labels >= 0])
        assert (lv.of_concept[labels < 0] >= len(values)).all()  # missing rank -> a pass-through node
    chain = [lv.nodes[lv.of_concept[tax.index("Actinopterygii")]] for lv in levels]
    assert chain == ["Chordata", "Chordata (no class)", "Chordata (no order)", "Chordata (no family)",
                     "Chordata (no genus)", "Chordata (no species)", "Actinopterygii"]
    assert chain[:-1] == [lv.nodes[lv.of_concept[tax.index("Tunicata")]] for lv in levels[:-1]]


@pytest.mark.parametrize("which", ["toy", "real"])
def test_parent_matrices_one_parent_per_child(tax, which):
    t = toy() if which == "toy" else tax
    head = HierarchicalSoftmaxHead(IN, t, 1.0)
    for i in range(len(head.levels) - 1):
        h = head.parent_matrix(i)
        assert h.shape == (len(head.levels[i].nodes), len(head.levels[i + 1].nodes))
        assert set(h.unique().tolist()) <= {0.0, 1.0} and torch.equal(h.T.sum(1), torch.ones(h.shape[1]))
        assert (h.sum(1) >= 1).all()  # every node has a child: no mass is lost on the way down


def test_uniform_choices_down_the_tree():
    head = HierarchicalSoftmaxHead(IN, toy(), 1.0)
    zero_(head)
    out = head(torch.randn(3, IN))
    # P1 -> {C1, C2}; C1 -> {O1, O2}; C2 -> (L3); P2 -> {C3, (L5)}; C3 -> O3 -> L4
    expected = torch.tensor([1 / 8, 1 / 8, 1 / 4, 1 / 4, 1 / 4]).expand(3, 5)
    assert torch.allclose(head.probs(out), expected, atol=1e-6)
    assert torch.allclose(out.aux["class"].softmax(-1), torch.tensor([1 / 4, 1 / 4, 1 / 4, 1 / 4]).expand(3, 4), atol=1e-6)


def test_confident_upper_level_suppresses_other_branch():
    head = HierarchicalSoftmaxHead(IN, toy(), 1.0)
    zero_(head)
    with torch.no_grad():
        level_fc(head, 0).bias.copy_(torch.tensor([8.0, -8.0]))  # P1
    p = head.probs(head(torch.randn(2, IN)))
    assert (p[:, 3:] < 1e-6).all()  # L4, L5 sit under P2
    assert torch.allclose(p[0, :3], torch.tensor([0.25, 0.25, 0.5]), atol=1e-5)


def test_hierarchical_loss_terms(ce):
    t = toy()
    head = HierarchicalSoftmaxHead(IN, t, 0.5)
    out, target = head(torch.randn(5, IN)), torch.arange(5)
    aux = [F.cross_entropy(out.aux[n], head.level_labels[i][target]) for i, n in enumerate(["phylum", "class", "order"])]
    base = build_loss(LossCfg(), np.ones(5), t.distance_matrix())
    assert torch.allclose(head.loss(out, target, None, base), base(out.logits, target) + 0.5 * torch.stack(aux).mean())
    assert head.level_labels.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 2, 3], [0, 1, 3, 2, 4]]


def test_hierarchical_softmax_matches_the_product_of_conditionals_value_and_gradient():
    """Reference: hierarchical softmax (Morin & Bengio 2005; YOLO9000's WordTree): P(leaf) is the product down its path of
    P(node | parent), each a softmax over that parent's children, written here as a loop over the tree in float64."""
    torch.manual_seed(0)
    head = HierarchicalSoftmaxHead(IN, toy(), 1.0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.3)
    feats = torch.randn(3, IN)
    target = torch.tensor([0, 2, 4])
    fa, fb = feats.clone().requires_grad_(True), feats.double().requires_grad_(True)
    got = head(fa).logits.log_softmax(-1)  # float32
    conditionals = []
    for i, lv in enumerate(head.levels):
        fc = level_fc(head, i)
        z = F.linear(fb, fc.weight.detach().double(), fc.bias.detach().double())
        groups = lv.parent if i > 0 else np.zeros(len(lv.nodes), dtype=np.int64)
        cond = torch.zeros_like(z)
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            cond[:, members] = z[:, members].softmax(-1)
        conditionals.append(cond)
    ref = torch.ones(3, 5, dtype=torch.float64)
    for i, lv in enumerate(head.levels):
        ref = ref * conditionals[i][:, lv.of_concept]
    torch.testing.assert_close(got.exp().double(), ref, rtol=1e-5, atol=1e-7)
    got.gather(1, target[:, None]).sum().backward()
    ref.log().gather(1, target[:, None]).sum().backward()
    assert fa.grad is not None and fb.grad is not None
    torch.testing.assert_close(fa.grad.double(), fb.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- conditional routing


def test_hard_routing_keeps_mass_under_argmax_parent():
    soft, hard = ConditionalHead(IN, toy(), 1.0, "soft", 1.0), ConditionalHead(IN, toy(), 1.0, "hard", 1.0)
    zero_(soft)
    with torch.no_grad():
        level_fc(soft, 0).bias.copy_(torch.tensor([0.3, 0.0]))  # P1 just ahead
        level_fc(soft, 1).bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))  # and C2 within P1
    hard.load_state_dict(soft.state_dict())
    feats = torch.randn(2, IN)
    ps, ph = soft.probs(soft(feats)), hard.probs(hard(feats))
    assert (ps[:, 3:] > 0.1).all()  # soft routing leaves P2's leaves real mass
    assert (ph[:, 3:] < 1e-6).all() and torch.allclose(ph[:, :3].sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(ph, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).expand(2, 5), atol=1e-5)  # argmax at every level: P1, C2, L3
    top = level_fc(hard, 0)
    top.bias.grad = None
    ph[:, 2].sum().backward()  # straight-through: the chosen branch still trains the top level
    assert top.bias.grad is not None and top.bias.grad.abs().sum() > 0


def test_gumbel_random_in_train_soft_in_eval():
    torch.manual_seed(0)
    gumbel = ConditionalHead(IN, toy(), 1.0, "gumbel", 0.7)
    soft = ConditionalHead(IN, toy(), 1.0, "soft", 0.7)
    soft.load_state_dict(gumbel.state_dict())
    feats = torch.randn(4, IN)
    gumbel.eval(), soft.eval()
    assert torch.allclose(gumbel(feats).logits, soft(feats).logits)
    gumbel.train()
    train_logits = gumbel(feats).logits
    assert not torch.allclose(train_logits, soft(feats).logits, atol=1e-3)
    assert not torch.allclose(train_logits, gumbel(feats).logits, atol=1e-3)  # a fresh sample each call


def test_conditional_soft_temperature_one_is_hierarchical():
    h = HierarchicalSoftmaxHead(IN, toy(), 1.0)
    c = ConditionalHead(IN, toy(), 1.0, "soft", 1.0)
    c.load_state_dict(h.state_dict())
    feats = torch.randn(3, IN)
    assert torch.allclose(h(feats).logits, c(feats).logits)


# ----------------------------------------------------------------------------- two_level


@pytest.mark.parametrize(
    "coarse,fine,level",
    [([0.8, 0.1, 0.1], [0.9, 0.025, 0.025, 0.025, 0.025], "fine"),
     ([0.8, 0.1, 0.1], [0.4, 0.3, 0.1, 0.1, 0.1], "coarse"),
     ([0.1, 0.4, 0.5], [0.9, 0.025, 0.025, 0.025, 0.025], "novel")],
)
def test_two_level_novelty(coarse, fine, level):
    head = build_head(cfg("two_level", coarse_rank="class", tau_coarse=0.6, tau_fine=0.5), IN, toy())
    assert isinstance(head, TwoLevelHead) and head.coarse_values == ["C1", "C2", "C3"]
    assert isinstance(head.fc, nn.Linear)  # not normalized: a plain Linear with a bias
    zero_(head)
    with torch.no_grad():
        head.coarse_fc.bias.copy_(torch.tensor(coarse).log())
        head.fc.bias.copy_(torch.tensor(fine).log())
    nov = head.novelty(head(torch.randn(2, IN)))
    assert nov["level"] == [level, level]
    assert torch.allclose(nov["coarse_prob"], torch.tensor(max(coarse)).expand(2))
    assert nov["coarse_label"].tolist() == [int(np.argmax(coarse))] * 2
    assert torch.allclose(nov["fine_prob"], torch.tensor(max(fine)).expand(2)) and nov["fine_label"].tolist() == [0, 0]
    assert nov["novel"].tolist() == [level == "novel"] * 2  # a row answered at the coarse rank is known there, not novel


def test_two_level_loss_ignores_concepts_without_coarse_rank():
    t = toy()
    base = build_loss(LossCfg(), np.ones(5), t.distance_matrix())
    head = build_head(cfg("two_level", coarse_rank="class", aux_weight=2.0), IN, t)
    out, target = head(torch.randn(3, IN)), torch.tensor([0, 3, 4])  # L5 has no class
    coarse = F.cross_entropy(out.aux["coarse"][:2], torch.tensor([0, 2]))
    assert torch.allclose(head.loss(out, target, None, base), base(out.logits, target) + 2.0 * coarse)


# ----------------------------------------------------------------------------- config


def test_config_head_section():
    cfg_ = load_config(None, ["head.name=conditional", "head.routing=gumbel", "head.temperature=2"])
    assert cfg_.head.name == "conditional" and cfg_.head.routing == "gumbel" and cfg_.head.temperature == 2.0
    fields = list(type(cfg_).__dataclass_fields__)
    assert fields.index("head") == fields.index("model") + 1
    assert load_config(None).head == HeadCfg()


def test_config_head_name_typo_suggests():
    with pytest.raises(ConfigError, match=r"unknown value 'per_rnk' \(did you mean 'per_rank'\?\)"):
        load_config(None, ["head.name=per_rnk"])


@pytest.mark.parametrize(
    "override,msg",
    [("head.dropout=1", "head.dropout"), ("head.dropout=-0.1", "head.dropout"), ("head.hidden=0", "head.hidden"),
     ("head.n_heads=0", "head.n_heads"), ("head.aux_weight=-1", "head.aux_weight"), ("head.tau_coarse=1.5", "head.tau_coarse"),
     ("head.tau_fine=-0.1", "head.tau_fine"), ("head.temperature=0", "head.temperature")],
)
def test_config_head_value_checks(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


# ----------------------------------------------------------------------------- cosine classifier (LDAM's NormedLinear)


def normed_linear_reference(x: torch.Tensor, weight_in_out: torch.Tensor) -> torch.Tensor:
    """NormedLinear.forward of kaidic/LDAM-DRW (models/resnet_cifar.py), written here: the weight is
    stored (in, out) and normalised per column; the features per row."""
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (weight_in_out / weight_in_out.norm(dim=0, keepdim=True).clamp_min(1e-12))


def test_normed_linear_matches_the_ldam_authors_value_and_gradient():
    torch.manual_seed(0)
    layer = NormedLinear(IN, 7)
    x = torch.randn(5, IN) * 3
    ref_w = layer.weight.detach().t().clone().requires_grad_(True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, ref = layer(xa), normed_linear_reference(xb, ref_w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert ref_w.grad is not None
    torch.testing.assert_close(layer.weight.grad, ref_w.grad.t(), rtol=1e-5, atol=1e-5)
    assert float(got.detach().abs().max()) <= 1.0 + 1e-6 and not any(n == "bias" for n, _ in layer.named_parameters())


@pytest.mark.parametrize("name", ["linear", "mlp", "multi", "per_rank", "two_level"])
def test_normalized_heads_give_cosine_logits(tax, name):
    torch.manual_seed(0)
    head = build_head(cfg(name, normalized=True), IN, tax, logit_scale=30.0).eval()
    out = head(100 * torch.randn(4, IN))
    assert float(out.logits.detach().abs().max()) <= 1.0 + 1e-6
    assert any(isinstance(m, NormedLinear) for m in head.modules())
    # the probabilities are the softmax LDAM trains: s x cosine, not a near-uniform softmax of cosines
    torch.testing.assert_close(head.probs(out), (30.0 * out.logits).softmax(-1))
    assert build_head(cfg(name), IN, tax, logit_scale=30.0).logit_scale == 1.0  # a plain head ignores the scale


def test_normalized_refused_where_there_is_no_leaf_linear(tax):
    with pytest.raises(ValueError, match="set head.normalized=false"):
        build_head(cfg("hierarchical_softmax", normalized=True), IN, tax)


# ----------------------------------------------------------------------------- coherent (C-HMCNN)


def test_toy_nodes_and_descendants():
    nodes = taxonomy_nodes(toy())
    assert nodes.names == ("kingdom:K", "phylum:P1", "phylum:P2", "class:C1", "class:C2", "class:C3", "order:O1", "order:O2",
                           "order:O3")
    idx = {n: i for i, n in enumerate(nodes.names)}
    assert [nodes.names[i] for i in nodes.of_concept] == ["order:O1", "order:O2", "class:C2", "order:O3", "phylum:P2"]
    below_p2 = {nodes.names[j] for j in np.flatnonzero(nodes.descendants[idx["phylum:P2"]])}
    assert below_p2 == {"phylum:P2", "class:C3", "order:O3"}
    assert nodes.descendants[idx["kingdom:K"]].all() and nodes.descendants.sum() == 9 + 5 + 3 + 3 + 1 + 2 + 3  # K, P1, P2, C1, C2, C3, the orders
    assert {nodes.names[j] for j in np.flatnonzero(nodes.on_path[3])} == {"kingdom:K", "phylum:P2", "class:C3", "order:O3"}


def test_real_nodes_every_rank_and_exceptions_below(tax):
    nodes = taxonomy_nodes(tax)
    n_values = sum(len({lin[r] for lin in tax.lineages if lin[r] is not None}) for r in range(7))
    assert len(nodes.names) == n_values + len(tax.exceptions)
    assert len(set(nodes.of_concept.tolist())) == tax.n_classes  # every concept its own node
    act, tun = nodes.of_concept[tax.index("Actinopterygii")], nodes.of_concept[tax.index("Tunicata")]
    chordata = nodes.names.index("phylum:Chordata")
    assert nodes.descendants[chordata, act] and nodes.descendants[chordata, tun] and act != tun


def reference_constrained(x: torch.Tensor, below: list[list[int]]) -> torch.Tensor:
    """get_constr_out of EGiunchiglia/C-HMCNN (main.py), written here as a loop: node i's output is the
    max of x over i and its descendants (`below[i]`), in float64 as there."""
    return torch.stack([x.double()[:, b].max(dim=1).values for b in below], dim=1)


def reference_mcloss(logits: torch.Tensor, labels: torch.Tensor, below: list[list[int]]) -> torch.Tensor:
    """The training step of EGiunchiglia/C-HMCNN (main.py): MCLoss = BCELoss of
    (1 - y) * constr(sigmoid) + y * constr(y * sigmoid), mean over samples and nodes."""
    out = logits.sigmoid()
    y = labels.double()
    train = (1 - y) * reference_constrained(out, below) + y * reference_constrained(y * out, below)
    return F.binary_cross_entropy(train, y)


def test_mcloss_matches_the_c_hmcnn_code_value_and_gradient(tax):
    torch.manual_seed(0)
    nodes = taxonomy_nodes(tax)
    below = [np.flatnonzero(row).tolist() for row in nodes.descendants]
    target = targets(tax)
    labels = torch.as_tensor(nodes.on_path[target.numpy()], dtype=torch.float32)
    z = 2 * torch.randn(len(target), len(nodes.names))
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    got = mc_loss(a, labels, torch.as_tensor(nodes.descendants, dtype=torch.float32), None)
    ref = reference_mcloss(b, labels, below)
    got.backward()
    ref.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    assert b.grad is not None
    torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-5, atol=1e-6)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])  # sample weights: the weighted mean over samples
    alone = mc_loss(z[:1], labels[:1], torch.as_tensor(nodes.descendants, dtype=torch.float32), None)
    torch.testing.assert_close(mc_loss(z, labels, torch.as_tensor(nodes.descendants, dtype=torch.float32), w), alone)


def test_max_constraint_parent_never_below_child(tax):
    torch.manual_seed(1)
    head = build_head(cfg("coherent"), IN, tax)
    assert isinstance(head, CoherentHead)
    p = head.coherent(head(3 * torch.randn(64, IN))).detach()
    parent, child = np.nonzero(head.nodes.descendants)
    assert bool((p[:, parent] >= p[:, child]).all())
    raw = head(3 * torch.randn(64, IN)).aux["nodes"].detach().sigmoid()
    np.testing.assert_allclose(max_constraint(raw, head.descendants).numpy(),
                               reference_constrained(raw, [np.flatnonzero(r).tolist() for r in head.nodes.descendants]).numpy(),
                               rtol=1e-6)


def test_coherent_answer_is_a_softmax_over_the_concepts_own_outputs(ce):
    t = toy()
    head = build_head(cfg("coherent", aux_weight=0.5), IN, t)
    assert isinstance(head, CoherentHead)
    out = head(torch.randn(3, IN))
    nodes = out.aux["nodes"]
    # L5 is phylum P2, an inner node with L4 below it: its own output, not the max over its subtree
    assert torch.equal(out.logits, nodes[:, [6, 7, 4, 8, 2]])
    torch.testing.assert_close(head.probs(out), nodes[:, [6, 7, 4, 8, 2]].softmax(-1))
    target, w = torch.tensor([0, 4, 3]), torch.tensor([1.0, 2.0, 0.5])
    base = build_loss(LossCfg(), np.ones(5), t.distance_matrix())
    mc = mc_loss(nodes, head.on_path[target], head.descendants, w)
    torch.testing.assert_close(head.loss(out, target, w, base), base(out.logits, target, w) + 0.5 * mc)
    assert head.on_path[4].tolist() == [1, 0, 1, 0, 0, 0, 0, 0, 0]  # L5's target: K and P2 only


def test_mcloss_is_finite_where_float32_sigmoids_saturate(tax):
    """The reference's BCE on probabilities has a 1 / (p (1 - p)) gradient; at logits of +-40 it is inf or NaN, MCLoss stays finite."""
    nodes = taxonomy_nodes(tax)
    target = targets(tax)
    labels = torch.as_tensor(nodes.on_path[target.numpy()], dtype=torch.float32)
    z = (40 * torch.sign(torch.randn(len(target), len(nodes.names)))).requires_grad_(True)
    loss = mc_loss(z, labels, torch.as_tensor(nodes.descendants, dtype=torch.float32), None)
    loss.backward()
    assert z.grad is not None
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and float(z.grad.abs().max()) <= 1.0
