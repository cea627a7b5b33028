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
