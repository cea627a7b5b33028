"""submission.csv: exactly one row per test annotation id, known names, validated before it is written."""
import pandas as pd
import pytest

from lib.core.errors import StageError
from lib.decide.submission import assemble, validate_submission, write_submission

NAMES = ["Asteroidea", "Sebastes", "Octopus rubescens"]
IDS = [5, 3, 9]


def sub(rows):
    return pd.DataFrame(rows, columns=["annotation_id", "concept_name"])


def test_valid_submission_passes():
    validate_submission(sub([(5, "Asteroidea"), (3, "Sebastes"), (9, "Sebastes")]), IDS, NAMES)


@pytest.mark.parametrize("rows,what", [
    ([(5, "Asteroidea"), (3, "Sebastes")], "1 missing ids"),
    ([(5, "Asteroidea"), (3, "Sebastes"), (9, "Sebastes"), (11, "Sebastes")], "1 extra ids"),
    ([(5, "Asteroidea"), (3, "Sebastes"), (9, "Sebastes"), (9, "Asteroidea")], "1 duplicate ids"),
    ([(5, "Asteroidea"), (3, "Sebastes"), (9, "Kraken")], "1 unknown names"),
])
def test_each_defect_is_named(rows, what):
    with pytest.raises(StageError, match=what):
        validate_submission(sub(rows), IDS, NAMES)


def test_wrong_header_is_refused():
    with pytest.raises(StageError, match="expected annotation_id,concept_name"):
        validate_submission(pd.DataFrame({"id": IDS, "concept_name": NAMES}), IDS, NAMES)


def test_assemble_keeps_json_order_and_answers_missing_rows_by_the_fallback():
    out, fell_back = assemble(IDS, {5: 2, 9: 1}, NAMES, fallback=0)
    assert out["annotation_id"].tolist() == IDS
    assert out["concept_name"].tolist() == ["Octopus rubescens", "Asteroidea", "Sebastes"]
    assert fell_back == [3]


def test_invalid_submission_is_never_written(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text("annotation_id,concept_name\n5,Asteroidea\n")  # an older, valid file stays as it was
    with pytest.raises(StageError):
        write_submission(sub([(5, "Asteroidea")]), path, IDS, NAMES)
    assert path.read_text() == "annotation_id,concept_name\n5,Asteroidea\n"
    write_submission(sub([(5, "Asteroidea"), (3, "Sebastes"), (9, "Sebastes")]), path, IDS, NAMES)
    assert pd.read_csv(path)["annotation_id"].tolist() == IDS


def test_full_submission_answers_every_test_id_and_lists_the_fallbacks(tmp_path):
    """The writer 04 and the kNN baseline share: JSON order, each id once, the rest answered by the train prior."""
    import json

    import numpy as np

    from lib.config import load_config
    from lib.data.taxonomy import load_taxonomy_csv
    from lib.decide.decode import prior_answer
    from lib.decide.submission import write_full_submission

    anns = [{"id": i, "image_id": 1, "bbox": [0, 0, 4, 4]} for i in (5, 3, 9, 3)]
    (tmp_path / "dataset_test.json").write_text(json.dumps({"images": [], "annotations": anns, "categories": []}))
    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path}"])
    tax = load_taxonomy_csv("configs/taxonomy/fathomnet2025.csv")
    counts = np.arange(tax.n_classes) + 1
    res = write_full_submission(cfg, {5: 2, 9: 1}, tax, counts, tmp_path / "submission.csv", fallbacks_csv=tmp_path / "fallbacks.csv")
    fallback = prior_answer(counts, tax.distance_matrix())
    assert res.fallback == fallback and res.fell_back == [3] and res.rows == 3
    written = pd.read_csv(tmp_path / "submission.csv")
    assert written["annotation_id"].tolist() == [5, 3, 9]
    assert written["concept_name"].tolist() == [tax.names[2], tax.names[fallback], tax.names[1]]
    assert pd.read_csv(tmp_path / "fallbacks.csv").to_dict("list") == {"annotation_id": [3], "concept_name": [tax.names[fallback]]}
