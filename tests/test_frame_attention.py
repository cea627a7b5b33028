"""Frame context learned end to end (model.frame_context=attention): the attention's masks, the frame samplers'
packing, frame ids, mixing within a frame, and inference over whole frames."""
from typing import Literal

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from lib.config import Config, ConfigError, HeadCfg, ModelCfg, load_config
from lib.core.errors import StageError
from lib.data.context import frame_ids
from lib.data.dataset import make_loader
from lib.data.mix import mix_batch
from lib.data.samplers import FrameBatchSampler, frame_units, pack_units
from lib.data.taxonomy import Taxonomy
from lib.engine.inference import predict
from lib.model.frame_attention import FrameAttention
from lib.model.net import build_net

CPU = torch.device("cpu")


def trained_like(dim: int = 12, layers: int = 2) -> FrameAttention:
    """A frame attention with random weights everywhere (a fresh one is the identity), in float64 so that sums in another
    order agree to 1e-12: what is left is rounding, not leakage."""
    torch.manual_seed(0)
    m = FrameAttention(dim, width=8, heads=2, layers=layers, dropout=0.5).double().eval()  # eval: every sibling seen
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


# ----------------------------------------------------------------------------- the attention layer


def test_a_fresh_layer_leaves_the_features_unchanged():
    torch.manual_seed(0)
    m = FrameAttention(12, width=8, heads=2, layers=2)
    f = torch.randn(7, 12)
    assert torch.equal(m(f, torch.tensor([0, 0, 1, 1, 1, 2, 0])), f)  # zero-initialised residual projections


def test_a_padded_sibling_and_other_frames_change_nothing():
    m, f = trained_like(), torch.randn(9, 12, dtype=torch.float64)
    alone = m(f[:3], torch.tensor([4, 4, 4]))  # a frame of 3 on its own: no padding
    # Beside a frame of 6, the frame of 3 is padded to 6 slots; the other frame's features never reach it.
    mixed = m(f, torch.tensor([4, 4, 4, 9, 9, 9, 9, 9, 9]))
    assert torch.allclose(mixed[:3], alone, rtol=0, atol=1e-12)
    other = f.clone()
    other[3:] = torch.randn(6, 12, dtype=torch.float64) * 10
    assert torch.allclose(m(other, torch.tensor([4, 4, 4, 9, 9, 9, 9, 9, 9]))[:3], alone, rtol=0, atol=1e-12)
    # An ROI alone in its frame sees itself only, whatever else is in the batch.
    assert torch.allclose(m(f, torch.arange(9))[0], m(f[:1], torch.tensor([0]))[0], rtol=0, atol=1e-12)
    # Siblings matter: the same ROI with and without them differs.
    assert not torch.allclose(alone[0], m(f[:1], torch.tensor([4]))[0])


def test_sibling_order_changes_nothing_and_rows_of_a_frame_need_not_be_adjacent():
    m, f = trained_like(), torch.randn(10, 12, dtype=torch.float64)
    frames = torch.tensor([1, 1, 2, 2, 2, 3, 1, 3, 2, 1])  # interleaved frames
    out = m(f, frames)
    for seed in range(3):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(m(f[perm], frames[perm]), out[perm], rtol=0, atol=1e-12)
    # Frame ids are labels only: renaming them changes nothing.
    assert torch.allclose(m(f, frames * 1000 - 7), out, rtol=0, atol=1e-12)


def test_sibling_dropout_hides_siblings_never_the_roi_itself_nor_padding():
    from lib.model.frame_attention import frame_layout, visible

    _, _, real = frame_layout(torch.tensor([0] * 3 + [1] * 40))
    assert torch.equal(visible(real), real[:, None, :].expand(-1, 40, -1))  # inference: every sibling, no padding
    torch.manual_seed(0)
    seen = visible(real, 0.5)
    assert not seen[0, :, 3:].any()  # padded slots of the frame of 3: never seen
    assert seen[1].diagonal().all() and seen[0].diagonal()[:3].all()  # each ROI sees itself
    off = seen[1][~torch.eye(40, dtype=torch.bool)].float().mean()
    assert 0.4 < off < 0.6  # about half of the siblings, per ROI
    m = FrameAttention(12, width=8, heads=2, dropout=0.5).train()
    f = torch.randn(6, 12)
    assert torch.equal(m(f, torch.tensor([0, 0, 1, 1, 1, 1])), f)  # a fresh layer is the identity in training too


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one frame id per row"):
        FrameAttention(12, 8, 2)(torch.randn(3, 12), torch.tensor([0, 1]))
    with pytest.raises(StageError, match="model.frame_width 10 does not split into model.frame_heads 4 heads"):
        FrameAttention(12, width=10, heads=4)


def toy() -> Taxonomy:
    return Taxonomy(names=("L1", "L2", "L3"), lineages=(("K", "P1", None, None, None, None, None),
                                                       ("K", "P2", "C1", None, None, None, None),
                                                       ("K", "P2", "C2", None, None, None, None)))


def net(frame_context: Literal["none", "attention"] = "none", **model):
    torch.manual_seed(0)
    cfg = Config(model=ModelCfg(backbone="resnet10t", pretrained="none", img_size=32, frame_context=frame_context, **model),
                 head=HeadCfg(name="linear"))
    return build_net(cfg, toy(), pretrained=False).eval()


def test_the_net_attends_only_with_attention_and_keeps_its_weights_in_the_state_dict():
    plain, framed = net(), net("attention", frame_layers=2)
    assert plain.frame_attention is None and not any(k.startswith("frame_attention.") for k in plain.state_dict())
    keys = [k for k in framed.state_dict() if k.startswith("frame_attention.blocks.1.")]
    assert "frame_attention.blocks.1.qkv.weight" in keys  # saved and loaded with the model, as the backbone and head are
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x, frames=torch.tensor([0, 0, 1, 1])), plain(x))  # no attention: frames are ignored
        # Without frames each ROI is its own frame.
        assert torch.equal(framed.features(x), framed.features(x, torch.arange(4)))


# ----------------------------------------------------------------------------- frames per batch


def check_batches(batches: list[list[int]], frames: np.ndarray, batch: int) -> None:
    """Batches hold at most `batch` rows, a frame of at most `batch` rows is never split, and one frame's rows in a batch
    are one unit (a batch never holds two chunks of a frame)."""
    size = dict(zip(*np.unique(frames, return_counts=True)))
    where: dict[int, set[int]] = {}
    for b, rows in enumerate(batches):
        assert 1 <= len(rows) <= batch
        for i in rows:
            where.setdefault(int(frames[i]), set()).add(b)
    for f, held in where.items():
        if size[f] <= batch:
            assert len(held) == 1, f"frame {f} of {size[f]} rows split"


FRAMES = np.repeat(np.arange(40), np.r_[[1] * 20, [2] * 8, [3] * 6, [5] * 3, [9, 11, 23]])  # 120 rows, frames up to 23


def test_every_row_once_whole_frames_and_deterministic_per_seed():
    rows = FRAMES[np.random.default_rng(0).permutation(len(FRAMES))]  # a frame's rows scattered through the data
    for batch in (8, 16, 32):
        got = FrameBatchSampler(rows, batch, generator=torch.Generator().manual_seed(5)).batches
        flat = sorted(i for b in got for i in b)
        assert flat == list(range(len(rows)))  # every row exactly once
        check_batches(got, rows, batch)
        again = FrameBatchSampler(rows, batch, generator=torch.Generator().manual_seed(5)).batches
        other = FrameBatchSampler(rows, batch, generator=torch.Generator().manual_seed(6)).batches
        assert got == again and got != other
        assert len(got) <= len(rows) // batch + 1 + max(0, len(got) // 3)  # next-fit leaves a little room, not much


def test_a_frame_larger_than_the_batch_is_split_into_near_equal_chunks():
    units = frame_units(np.array([7] * 23 + [3] * 2), 8, torch.Generator().manual_seed(0))
    assert [len(u) for u in units] == [8, 8, 7, 2]  # ceil(23 / 8) = 3 chunks of 8, 8, 7 (not 8, 8, 7 by luck: array_split)
    assert sorted(np.concatenate(units[:3]).tolist()) == list(range(23))
    assert [len(u) for u in frame_units(np.array([1] * 17), 8)] == [6, 6, 5]
    assert frame_units(np.array([1] * 17), 8)[0].tolist() == [0, 1, 2, 3, 4, 5]  # inference: consecutive, in row order


def test_packing_is_next_fit_and_a_lone_last_row_joins_a_batch_with_room():
    units = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7]), np.array([8])]
    assert pack_units(units, [0, 1, 2, 3], 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_units(units, [0, 1, 2, 3], 3) == [[0, 1, 2], [3, 4, 8], [5, 6, 7]]  # the lone row 8 joins the first with room
    # Two chunks of one frame never share a batch, even where they would fit.
    assert pack_units([np.array([0, 1]), np.array([2, 3])], [9, 9], 8) == [[0, 1], [2, 3]]
    # Weighted draws repeat a one-ROI frame back to back: no batch of one row is left anywhere (BatchNorm cannot train
    # on it); without room it goes to the smallest batch that lacks its frame, one row over the size, and a repeat of a
    # frame that every other batch holds goes to the smallest one.
    draws = [np.array([0, 1]), np.array([2]), np.array([2]), np.array([3, 4])]
    assert pack_units(draws, [0, 1, 1, 2], 3) == [[0, 1, 2], [2, 3, 4]]
    assert pack_units([np.array([0, 1, 2]), np.array([3]), np.array([3])], [0, 1, 1], 3) == [[0, 1, 2, 3, 3]]


def test_inference_batches_are_frames_in_order():
    got = FrameBatchSampler(np.array([5, 5, 2, 9, 2, 9, 9]), 4).batches
    assert got == [[0, 1, 2, 4], [3, 5, 6]]


def test_class_balanced_frames_draw_whole_frames_by_their_rows_weight():
    labels = np.repeat([0, 1], [100, 20])  # class 0 in 25 frames of 4, class 1 in 20 frames of 1
    frames = np.r_[np.repeat(np.arange(25), 4), 100 + np.arange(20)]
    got = FrameBatchSampler(frames, 16, name="class_balanced", labels=labels, generator=torch.Generator().manual_seed(0)).batches
    rows = np.concatenate(got)
    assert len(frames) <= len(rows) < len(frames) + 4  # an epoch keeps its length (up to the last frame drawn)
    assert abs(np.mean(labels[rows] == 1) - 0.5) < 0.12  # frames of one class: the classes come out balanced
    for b in got:  # drawn frames stay whole, and a batch holds each frame once
        f = frames[b]
        assert all((f == v).sum() == (4 if v < 100 else 1) for v in np.unique(f))
    with pytest.raises(ValueError, match="needs the rows' labels and a generator"):
        FrameBatchSampler(frames, 16, name="sqrt")


def test_torchrun_ranks_share_out_whole_frames():
    """Every rank packs the same batches from the same seed and takes every world-th: frames, not rows, are split across
    ranks, each rank gets as many batches, and the ranks never share a frame in one step."""
    gen = lambda: torch.Generator().manual_seed(3)
    whole = FrameBatchSampler(FRAMES, 8, generator=gen()).batches
    ranks = [FrameBatchSampler(FRAMES, 8, generator=gen(), rank=r, world=3).batches for r in range(3)]
    assert len({len(b) for b in ranks}) == 1 and len(ranks[0]) == len(whole) // 3
    for r, got in enumerate(ranks):
        assert got == whole[r::3][: len(whole) // 3]
        check_batches(got, FRAMES, 8)
    seen = [{int(FRAMES[i]) for b in got for i in b} for got in ranks]
    small = {f for f, n in zip(*np.unique(FRAMES, return_counts=True)) if n <= 8}
    assert not any(seen[a] & seen[b] & small for a in range(3) for b in range(a + 1, 3))  # a whole frame goes to one rank


# ----------------------------------------------------------------------------- frame ids, mixing


def test_frames_are_keyed_by_split_and_image_id():
    rows = pd.DataFrame({"split": ["train", "train", "test", "test", "train"], "image_id": [7, 7, 7, 8, 8]})
    ids = frame_ids(rows)
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 4  # test image 7 is not train image 7
    with pytest.raises(StageError, match="no image_id column"):
        frame_ids(rows.drop(columns="image_id"))
    with pytest.raises(StageError, match="1 ROI rows have no image_id"):
        frame_ids(rows.assign(image_id=[7, None, 7, 8, 8]))


def test_fold_rows_and_pseudo_rows_keep_their_frames(tmp_path):
    from lib.engine.folds import fold_splits
    from lib.engine.selftrain import pseudo_rows

    rois = pd.DataFrame({"split": ["train"] * 4 + ["test"] * 2, "ok": 1, "annotation_id": [1, 2, 3, 4, 1, 2],
                         "image_id": [10, 10, 11, 11, 10, 12], "label": [0, 1, 0, 1, -1, -1], "fold": [0, 0, 1, 1, -1, -1],
                         "crop_path": [f"c{i}" for i in range(6)]})
    (tmp_path / "p.csv").write_text("annotation_id,label,concept_name,weight,source\n1,1,L2,0.8,vote\n2,0,L1,0.9,vote\n")
    extra = pseudo_rows(load_config(None, []), tmp_path / "p.csv", rois)
    split = fold_splits(rois, [0], extra)[0]
    assert split.train[["split", "image_id"]].values.tolist() == [["train", 11], ["train", 11], ["test", 10], ["test", 12]]
    assert split.val[["split", "image_id"]].values.tolist() == [["train", 10], ["train", 10]]
    ids = frame_ids(split.train)
    assert ids[0] == ids[1] and ids[2] != ids[3]


def test_mixing_within_a_frame():
    gen = torch.Generator().manual_seed(0)
    x, y, frames = torch.randn(9, 3, 8, 8), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2]), torch.tensor([4, 4, 4, 5, 5, 6, 7, 7, 7])
    for same_leaf in (False, True):
        for _ in range(5):
            _, y_soft, _, info = mix_batch(x, y, None, n_classes=3, mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, same_leaf=same_leaf,
                                           generator=gen, return_info=True, frames=frames)
            assert torch.equal(frames[info.partner], frames)  # every partner is a sibling
            assert info.partner[5] == 5 and torch.allclose(y_soft[5], torch.tensor([0.0, 0.0, 1.0]))  # alone: unmixed
            if same_leaf:
                assert torch.equal(y[info.partner], y)
                assert info.partner[3] == 3 and info.partner[0] != 0  # alone with its label in its frame / a sibling of its label
            else:
                assert (info.partner[:3] != torch.arange(3)).all()


def test_config_keys():
    cfg = load_config(None, ["model.frame_context=attention", "model.frame_layers=2", "model.frame_heads=2", "model.frame_width=64"])
    assert (cfg.model.frame_context, cfg.model.frame_layers, cfg.model.frame_heads, cfg.model.frame_width) == ("attention", 2, 2, 64)
    assert load_config(None, []).model.frame_context == "none"
    with pytest.raises(ConfigError, match="model.frame_width must be a positive multiple of model.frame_heads"):
        load_config(None, ["model.frame_width=30", "model.frame_heads=4"])
    with pytest.raises(ConfigError, match=r"model.frame_dropout must lie in \[0, 1\)"):
        load_config(None, ["model.frame_dropout=1.0"])
    with pytest.raises(ConfigError):
        load_config(None, ["model.frame_context=graph"])


# ----------------------------------------------------------------------------- inference over whole frames


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        p = d / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        paths.append(str(p))
    return paths


CROP_FRAMES = np.array([3, 1, 3, 2, 1, 3, 0, 2, 3, 3, 1])  # frame 3 has 5 rows: larger than the batch of 4


def loader(paths, frames=None):
    return make_loader(paths, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=4, num_workers=0, device=CPU, frames=frames)


def test_predict_over_frames_equals_predict_ungrouped_without_frame_context(crops):
    model = net()
    plain = predict(model, loader(crops), CPU, views=["identity", "hflip"], keep_views=True)
    grouped = predict(model, loader(crops, CROP_FRAMES), CPU, views=["identity", "hflip"], keep_views=True)
    assert list(grouped) == list(plain)
    for k in plain:
        assert np.allclose(grouped[k], plain[k], atol=1e-5), k  # back in row order


def test_predict_with_frame_attention_sees_each_frame_alone(crops):
    """The loader's batches hold whole frames (frame 3 in two chunks, as the batch holds 4): each ROI's probabilities are
    those of its own frame (chunk) run alone, in row order."""
    model = net("attention", frame_width=16, frame_heads=2)
    with torch.no_grad():
        for p in model.frame_attention.parameters():
            p.normal_(0, 0.2)
    got = predict(model, loader(crops, CROP_FRAMES), CPU)["probs"]
    batches = FrameBatchSampler(CROP_FRAMES, 4).batches
    assert sorted(len(b) for b in batches if set(CROP_FRAMES[b]) == {3}) == [2, 3]
    x = torch.stack([loader(crops).dataset[i][0] for i in range(len(crops))])
    with torch.no_grad():
        for b in batches:
            for f in np.unique(CROP_FRAMES[b]):
                rows = [i for i in b if CROP_FRAMES[i] == f]
                alone = model.probs(x[rows], torch.zeros(len(rows), dtype=torch.long)).numpy()
                assert np.allclose(got[rows], alone, atol=1e-5)
    ungrouped = predict(model, loader(crops), CPU)["probs"]
    assert not np.allclose(got, ungrouped, atol=1e-3)  # the siblings change the answer


def test_the_attention_runs_in_autocast_and_the_head_gives_float32():
    """Under the precision policy's autocast (bf16 here, on the CPU), the frame attention runs in low precision and the
    probabilities come out float32 as the heads make them; a padded sibling still changes nothing to bf16's precision."""
    from lib.model.device import autocast

    model = net("attention", frame_width=16, frame_heads=2)
    with torch.no_grad():
        for p in model.frame_attention.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), autocast(CPU, "bf16"):
        out = model(x, full=True, frames=torch.tensor([0, 0, 1, 1, 1]))
        alone = model(x[:2], full=True, frames=torch.tensor([0, 0]))
        p = model.head_module.probs(out)
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and torch.allclose(p.sum(1), torch.ones(5), atol=1e-3)
    assert torch.allclose(out.logits[:2].float(), alone.logits.float(), atol=0.05)


def test_too_few_frames_for_the_torchrun_processes_is_one_sentence(monkeypatch):
    from lib.engine import train
    from lib.model import dist as ddp

    monkeypatch.setattr(ddp, "world_size", lambda: 4)
    monkeypatch.setattr(ddp, "rank", lambda: 3)
    with pytest.raises(StageError, match=r"^The training frames fill fewer batches than the 4 torchrun processes; start fewer "
                                         r"processes or lower train.batch_size\.$"):
        train.frame_batches(np.array([0, 0, 1, 2]), np.zeros(4, dtype=int), "random", 2, torch.Generator().manual_seed(0))
