"""augment.frame_resample (lib.data.resample): the 1st place's whole-frame down-then-up resampling on 00's stored crops."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lib.config import AugmentCfg, ConfigError, PrepareCfg, load_config
from lib.data.crops import BoxJob, CropSpec, crop_one_frame
from lib.data.dataset import CropDataset, seed_worker
from lib.data.resample import FrameResample, frame_resample, kept_pixels, native_extent, native_extents, resample_crop

FRAME = (1920.0, 1080.0)
S = 96  # stored crop side (prepare.crop_size)


# ----------------------------------------------------------------------------- native extents and kept pixels


@pytest.mark.parametrize("view,box,frame,square,want", [
    # ROI: box 50 x 30 padded by 10% a side = 60 x 36, squared to 60; centre (125, 215): window 95..155 x 185..245
    ("1", (100, 200, 50, 30), FRAME, True, (60, 60)),
    ("1", (100, 200, 50, 30), FRAME, False, (60, 36)),
    # at the frame's corner the window is clipped: centre (25, 15), x 0..55, y 0..45
    ("1", (0, 0, 50, 30), FRAME, True, (55, 45)),
    # no frame size: the padded box, unclipped
    ("1", (0, 0, 50, 30), None, True, (60, 60)),
    ("1", (0, 0, 50, 30), None, False, (60, 36)),
    # k x context: k times the box's longer side, rounded as crops.crop_context does
    ("3", (100, 200, 50, 30), FRAME, True, (150, 150)),
    ("5", (100, 200, 20, 33), None, True, (165, 165)),
    # the letterboxed frame spans its longer side on both axes
    ("full", (100, 200, 50, 30), FRAME, True, (1920, 1920)),
    ("full", None, (600.0, 800.0), True, (800, 800)),
])
def test_native_extent_worked_values(view, box, frame, square, want):
    assert native_extent(view, box, frame, pad=0.1, square=square) == pytest.approx(want)


def test_native_extent_unknown():
    assert native_extent("full", (1, 2, 3, 4), None, 0.1, True) is None  # no frame size
    assert native_extent("1", None, FRAME, 0.1, True) is None  # no box
    assert native_extent("3", None, FRAME, 0.1, True) is None
    assert native_extent("1", (5000, 5000, 10, 10), FRAME, 0.0, True) is None  # wholly outside the frame


@pytest.mark.parametrize("native,f,want", [
    (1920, 0.1, S),  # the full frame at f = 0.1 keeps 192 px: more than the 96 stored
    (1920, 0.02, 38),  # 38.4 px
    (120, 0.1, 12),  # a 100 px box (120 px padded) keeps about 12 px
    (60, 1.0, S),  # a box smaller than the crop (upscaled by 00) is untouched at f = 1
    (60, 0.5, 30),
    (50, 0.01, 1),  # at least one pixel
    (None, 0.5, 48),  # unknown: f on the stored crop itself
    (None, 1.0, S),
])
def test_kept_pixels(native, f, want):
    assert kept_pixels(S, native, f) == want


def test_native_extents_from_rows():
    rows = pd.DataFrame({"x": [100, 0, np.nan], "y": [200, 0, 1], "w": [50, 50, 10], "h": [30, 30, 10],
                         "frame_w": [1920, np.nan, 1920], "frame_h": [1080, np.nan, 1080]})
    got = native_extents(rows, ["1", "3", "full"], pad=0.1, square=True)
    assert got.shape == (3, 3, 2)
    np.testing.assert_allclose(got[0], [[60, 60], [150, 150], [1920, 1920]])
    np.testing.assert_allclose(got[1, :2], [[60, 60], [150, 150]])  # no frame size: ROI unclipped, full unknown
    assert np.isnan(got[1, 2]).all() and np.isnan(got[2, :2]).all()  # no box: ROI and context unknown
    np.testing.assert_allclose(got[2, 2], [1920, 1920])
    old = rows.drop(columns=["frame_w", "frame_h"])  # a rois.csv cut before 00 recorded frame sizes
    assert np.isnan(native_extents(old, ["full"], 0.1, True)).all()


def test_crop_worker_reports_the_frame_size():
    """00 fills rois.csv's frame_w, frame_h from the decoded frame the worker cut."""
    frame = np.zeros((50, 80, 3), np.uint8)
    got = crop_one_frame(frame, [BoxJob(bbox=(10, 10, 20, 20), outputs={})], CropSpec(size=16))
    assert got.errors == [""] and got.frame_size == (80, 50)


# ----------------------------------------------------------------------------- on crops


def noise(seed: int, side: int = S) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def hf_energy(img: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels: what blurring removes."""
    a = img.astype(np.float64)
    return float((np.diff(a, axis=0) ** 2).mean() + (np.diff(a, axis=1) ** 2).mean())


def write_views(folder: Path, n_rows: int, n_views: int) -> list[tuple[str, ...]]:
    paths = []
    for i in range(n_rows):
        names = []
        for v in range(n_views):
            p = folder / f"{i}_{v}.png"
            cv2.imwrite(str(p), noise(i))  # every view of a row holds the same pixels
            names.append(str(p))
        paths.append(tuple(names))
    return paths


def test_unit_factor_changes_nothing(tmp_path):
    paths = write_views(tmp_path, 2, 3)
    ext = np.array([[[60, 60], [150, 150], [1920, 1920]]] * 2, float)  # the ROI smaller than the crop too
    plain = CropDataset(paths)
    ds = CropDataset(paths, resample=FrameResample(1.0, 1.0, 1.0, ext))
    for i in range(2):
        assert np.array_equal(ds[i][0].numpy(), plain[i][0].numpy())


def test_small_box_blurs_more_than_the_frame():
    """As in the original: at f the frame keeps f x 1920 px, a 100 px box about f x 120 px, so the ROI view loses far more
    detail than the full view, and the 3x context lies between."""
    img = noise(0)
    roi, ctx, full = (resample_crop(img, (n, n), 0.04) for n in (120.0, 300.0, 1920.0))
    e0, er, ec, ef = hf_energy(img), hf_energy(roi), hf_energy(ctx), hf_energy(full)
    assert er < ec < ef < e0  # 5 px, 12 px, 77 px of the 96 stored
    assert er < 0.01 * ef
    assert np.array_equal(resample_crop(img, (1920.0, 1920.0), 0.1), img)  # 192 px of frame detail: the stored 96 stand


def test_views_of_one_sample_share_the_factor(tmp_path):
    paths = write_views(tmp_path, 1, 3)
    ext = np.full((1, 3, 2), np.nan)  # unknown extents: each view is resampled by f itself, so equal factors give equal views
    ds = CropDataset(paths, resample=FrameResample(1.0, 0.05, 1.0, ext))
    seen = set()
    for seed in range(6):
        seed_worker(seed)
        x = ds[0][0].numpy()
        assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])
        np.random.seed(seed)  # the same draw by hand: the factor comes from the reseeded global generator
        f = FrameResample(1.0, 0.05, 1.0, ext).draw()
        assert f is not None and np.array_equal(x[0], resample_crop(noise(0)[..., ::-1], None, f))  # read as RGB
        seen.add(x.tobytes())
    assert len(seen) >= 4  # the seeds drew other factors (two may round to the same pixel count)


def test_same_seed_same_sample(tmp_path):
    paths = write_views(tmp_path, 1, 2)
    ext = np.array([[[120, 120], [1920, 1920]]], float)
    ds = CropDataset(paths, resample=FrameResample(1.0, 0.01, 1.0, ext))
    outs = []
    for _ in range(2):
        seed_worker(123)
        outs.append(ds[0][0].numpy())
    assert np.array_equal(*outs)


def test_probability_zero_is_the_identity_and_draws_nothing(tmp_path):
    paths = write_views(tmp_path, 2, 2)
    ds = CropDataset(paths, resample=FrameResample(0.0, 0.01, 0.02, np.full((2, 2, 2), np.nan)))
    plain = CropDataset(paths)
    np.random.seed(5)
    for i in range(2):
        assert np.array_equal(ds[i][0].numpy(), plain[i][0].numpy())
    assert np.random.random() == np.random.RandomState(5).random_sample()  # no draw was taken from the generator
    assert frame_resample(pd.DataFrame({"x": [1.0]}), ["1"], AugmentCfg(), PrepareCfg()) is None  # the default is off


def test_single_view_rows_resample_too(tmp_path):
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), noise(1))
    ds = CropDataset([str(p)], resample=FrameResample(1.0, 0.05, 0.05, np.array([[[120.0, 120.0]]])))
    assert hf_energy(ds[0][0]) < 0.2 * hf_energy(noise(1))


def test_builder_reads_rows_and_config():
    rows = pd.DataFrame({"x": [100.0], "y": [200.0], "w": [50.0], "h": [30.0], "frame_w": [1920.0], "frame_h": [1080.0]})
    got = frame_resample(rows, ["1", "full"], AugmentCfg(frame_resample=0.7, frame_resample_range=[0.2, 0.6]), PrepareCfg())
    assert got is not None and (got.p, got.low, got.high) == (0.7, 0.2, 0.6)
    np.testing.assert_allclose(got.extents, [[[60, 60], [1920, 1920]]])
    with pytest.raises(ValueError, match="one per crop"):
        CropDataset(["a.png", "b.png"], resample=got)


# ----------------------------------------------------------------------------- config


def test_config_keys_and_defaults():
    cfg = load_config(None, ["augment.frame_resample=1", "augment.frame_resample_range=[0.05, 0.5]"])
    assert cfg.augment.frame_resample == 1.0 and cfg.augment.frame_resample_range == [0.05, 0.5]
    assert AugmentCfg().frame_resample == 0.0 and AugmentCfg().frame_resample_range == [0.01, 1.0]
    assert "frame_resample" in AugmentCfg().probabilities()


@pytest.mark.parametrize("override,msg", [
    ("augment.frame_resample=1.5", r"augment.frame_resample is a probability and must lie in \[0, 1\], got 1.5; fix it"),
    ("augment.frame_resample=-0.1", "augment.frame_resample is a probability"),
    ("augment.frame_resample_range=[0, 1]", r"augment.frame_resample_range must be \[low, high\] with 0 < low <= high <= 1"),
    ("augment.frame_resample_range=[0.5, 0.2]", "augment.frame_resample_range must be"),
    ("augment.frame_resample_range=[0.5, 1.5]", "augment.frame_resample_range must be"),
    ("augment.frame_resample_range=[0.5]", "augment.frame_resample_range must be"),
])
def test_config_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


# ----------------------------------------------------------------------------- the training rows carry their geometry


def test_training_rows_carry_box_and_frame_size(tmp_path):
    """fold_splits and 03's pseudo-labelled rows keep the columns the native extents come from; validation needs none."""
    from lib.engine.folds import fold_splits
    from lib.engine.selftrain import pseudo_rows

    geo = {"x": [10.0, 20, 30, 40], "y": [5.0, 6, 7, 8], "w": [50.0, 40, 30, 20], "h": [30.0, 30, 30, 30],
           "frame_w": [1920.0] * 4, "frame_h": [1080.0] * 4}
    rois = pd.DataFrame({"split": ["train", "train", "train", "test"], "ok": 1, "annotation_id": [0, 1, 2, 3],
                         "image_id": [1, 1, 2, 3], "label": [0, 1, 0, -1], "fold": [0, 1, 1, -1],
                         "crop_path": ["c0", "c1", "c2", "c3"], **geo})
    (tmp_path / "p.csv").write_text("annotation_id,label,weight,source\n3,1,0.5,confidence\n")
    extra = pseudo_rows(load_config(None, []), tmp_path / "p.csv", rois)
    assert extra[["x", "w", "frame_w"]].values.tolist() == [[40.0, 20.0, 1920.0]]
    split = fold_splits(rois, [0], extra)[0]
    got = native_extents(split.train, ["1", "full"], 0.1, True)
    np.testing.assert_allclose(got[:, 1], [[1920, 1920]] * 3)  # rows 1, 2 and the pseudo-labelled test row
    np.testing.assert_allclose(got[:, 0, 0], [48, 36, 36])  # longer sides 40, 30, 30 padded by 20%
    assert "frame_w" not in split.val
