"""A dataset that is not FathomNet, as a new user brings it: 10 garden birds, its own 7-rank taxonomy table, train and
test frames in one folder (JPEGs named by file_name, image ids repeating across the two JSON files)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from lib.core.paths import ROOT
from lib.decide.metric import main as metric_main

from conftest import load_script  # tests/conftest.py

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
BIRDS = [  # (concept, family, genus, species); Corvus is a genus-level concept: its species is empty
    ("Parus major", "Paridae", "Parus", "Parus major"), ("Cyanistes caeruleus", "Paridae", "Cyanistes", "Cyanistes caeruleus"),
    ("Periparus ater", "Paridae", "Periparus", "Periparus ater"), ("Erithacus rubecula", "Muscicapidae", "Erithacus", "Erithacus rubecula"),
    ("Turdus merula", "Turdidae", "Turdus", "Turdus merula"), ("Turdus philomelos", "Turdidae", "Turdus", "Turdus philomelos"),
    ("Fringilla coelebs", "Fringillidae", "Fringilla", "Fringilla coelebs"),
    ("Carduelis carduelis", "Fringillidae", "Carduelis", "Carduelis carduelis"),
    ("Passer domesticus", "Passeridae", "Passer", "Passer domesticus"), ("Corvus", "Corvidae", "Corvus", ""),
]


def write_birds(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """train.json, test.json, taxonomy.csv and images/ (both splits) under root, two birds per 128x96 frame."""
    (root / "images").mkdir(parents=True)
    rows = [f"{i},{name},Animalia,Chordata,Aves,Passeriformes,{fam},{genus},{sp},0" for i, (name, fam, genus, sp) in enumerate(BIRDS, 1)]
    (root / "taxonomy.csv").write_text("category_id,concept_name," + ",".join(RANKS) + ",exception\n" + "\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    categories = [{"id": i, "name": b[0]} for i, b in enumerate(BIRDS, 1)]
    truth = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(len(BIRDS)), per_class))
        images: list[dict] = []
        annotations: list[dict] = []
        for f, pair in enumerate(labels.reshape(-1, 2), 1):  # image ids 1.. in both files: they repeat across splits
            name = f"garden_{split}_{f:03d}.jpg"
            im = Image.new("RGB", (128, 96), (90, 140, 90))
            draw = ImageDraw.Draw(im)
            for j, label in enumerate(pair):
                x, y = 10 + 60 * j, int(rng.integers(10, 40))
                colour = tuple(int(c) for c in np.array([25 * label, 255 - 20 * label, (90 * label) % 256]))
                draw.ellipse((x, y, x + 40, y + 40), fill=colour)
                ann_id = len(annotations) + 1 + (1000 if split == "test" else 0)
                annotations.append({"id": ann_id, "image_id": f, "category_id": int(label) + 1 if split == "train" else None,
                                    "bbox": [x, y, 40, 40]})
                if split == "test":
                    truth.append((ann_id, BIRDS[label][0]))
            im.save(root / "images" / name, quality=95)
            images.append({"id": f, "file_name": name, "width": 128, "height": 96, "coco_url": ""})
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    Image.new("RGB", (128, 96)).save(root / "images" / "1.png")  # a decoy named like image 1 of both files: file_name wins
    pd.DataFrame(truth, columns=["annotation_id", "concept_name"]).to_csv(root / "solution.csv", index=False)
    return root


def birds_overrides(root: Path, out: Path) -> list[str]:
    """The README's worked example as overrides: every data.* key, one frames folder for both splits."""
    return ["--config", "configs/demo.yaml", "exp=birds", f"output_root={out}", f"data.root={root}", "data.train_json=train.json",
            "data.test_json=test.json", "data.train_images=images", "data.test_images=images",
            f"data.taxonomy_csv={root / 'taxonomy.csv'}", "data.taxonomy_source=csv", "prepare.n_folds=2", "prepare.crop_size=32",
            "prepare.workers=1", "prepare.test_like=false", "model.img_size=32", "knn.img_size=32", "train.epochs=1",
            "pseudo.threshold=0.0", "pseudo.methods=[confidence]", "tta.views=[identity]"]


def test_own_dataset_prepares_with_its_own_table(tmp_path):
    root = write_birds(tmp_path / "birds")
    assert load_script("00_prepare_data.py").main(birds_overrides(root, tmp_path / "out")) == 0
    prep = tmp_path / "out" / "birds" / "00_prepare"
    rois = pd.read_csv(prep / "rois.csv")
    assert (rois["split"] == "train").sum() == 40 and (rois["split"] == "test").sum() == 20 and rois["ok"].all()
    names = [c["name"] for c in json.loads((prep / "taxonomy.json").read_text())["concepts"]]
    assert names == [b[0] for b in BIRDS]
    first = rois[(rois["split"] == "train") & (rois["image_id"] == 1)].iloc[0]
    assert np.asarray(Image.open(prep / first["crop_path"])).mean() > 40  # cut from garden_train_001.jpg, not the black 1.png


def test_categories_missing_from_the_default_table_name_the_table_and_the_key(tmp_path, capsys):
    root = write_birds(tmp_path / "birds")
    args = [a for a in birds_overrides(root, tmp_path / "out") if not a.startswith("data.taxonomy_csv=")]
    assert load_script("00_prepare_data.py").main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 10 categories of the train JSON (Parus major, Cyanistes caeruleus,")
    assert f"are missing from the taxonomy table '{ROOT / 'configs/taxonomy/fathomnet2025.csv'}' (data.taxonomy_csv); " \
           "set data.taxonomy_csv to a table of your dataset's concepts" in err


def test_metric_scores_another_dataset_with_taxonomy(tmp_path, capsys):
    root = write_birds(tmp_path / "birds")
    sub = pd.read_csv(root / "solution.csv").assign(concept_name="Turdus merula")
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert metric_main([str(root / "solution.csv"), str(tmp_path / "sub.csv"), "--taxonomy", str(root / "taxonomy.csv")]) == 0
    assert capsys.readouterr().out.startswith("score ")
    assert metric_main([str(root / "solution.csv"), str(tmp_path / "sub.csv")]) == 2  # the default: FathomNet's table
    err = capsys.readouterr().err
    assert "The solution names 10 concepts not in the taxonomy table" in err and "--taxonomy CSV" in err
    with pytest.raises(SystemExit):
        metric_main(["--help"])
    assert "--taxonomy CSV" in capsys.readouterr().out


@pytest.mark.slow
def test_own_dataset_runs_to_a_submission(tmp_path):
    """Every stage on the birds (as make stages runs them): every test annotation answered with one of its concepts."""
    root = write_birds(tmp_path / "birds")
    args = birds_overrides(root, tmp_path / "out")
    for script in ("00_prepare_data.py", "01_train_folds.py", "02_pseudo_label.py", "03_retrain.py", "04_infer_submit.py",
                   "knn_baseline.py"):
        assert load_script(script).main(args) == 0, script
    for sub in ("04_submit", "knn"):
        frame = pd.read_csv(tmp_path / "out" / "birds" / sub / "submission.csv")
        assert sorted(frame["annotation_id"]) == sorted(pd.read_csv(root / "solution.csv")["annotation_id"])
        assert set(frame["concept_name"]) <= {b[0] for b in BIRDS}
