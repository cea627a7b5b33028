"""The metric against the competition's worked values and the distance matrix's properties."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lib.data.taxonomy import RANKS, distance, load_taxonomy_csv
from lib.decide.metric import DEFAULT_TAXONOMY, MetricError, main, score_frames

TAX = load_taxonomy_csv(DEFAULT_TAXONOMY)


def d(a: str, b: str) -> float:
    D = TAX.distance_matrix()
    return float(D[TAX.index(a), TAX.index(b)])


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("Sebastes", "Sebastes diploproa", 1),
        ("Pandalus amplus", "Pandalus platyceros", 2),
        ("Caridea", "Heterocarpus", 3),
        ("Holothuroidea", "Scotoplanes globosa", 4),
        ("Octopus rubescens", "Sebastes diploproa", 12),
        ("Sebastes", "Sebastes", 0),
    ],
)
def test_worked_values(a, b, expected):
    assert d(a, b) == expected
    assert d(b, a) == expected


def test_taxonomy_table_shape():
    assert TAX.n_classes == 79
    assert len(TAX.exceptions) == 5
    assert all(len(lin) == len(RANKS) for lin in TAX.lineages)


def test_matrix_properties():
    D = TAX.distance_matrix()
    assert D.shape == (79, 79)
    assert np.array_equal(D, D.T)
    assert np.all(np.diag(D) == 0)
    off = D[~np.eye(79, dtype=bool)]
    assert off.min() >= 1 and D.max() <= 12
    # Two exception concepts listed with one lineage are still different concepts.
    assert d("Actinopterygii", "Tunicata") == 2
    assert D.max() == 12


def _formula(S, P, exc):
    """The metric exactly as written in the competition notes, on names."""
    LS, LP = TAX.lineages[TAX.index(S)], TAX.lineages[TAX.index(P)]
    out = 0 if S == P else int(P in exc) + int(S in exc)
    for s, p in zip(LS, LP):
        if p is None:
            out += 1 if s is not None else 0
        elif p != s:
            out += 2 if s is not None else 1
    return out


def test_matrix_equals_formula_for_every_pair():
    D = TAX.distance_matrix()
    for i, s in enumerate(TAX.names):
        for j, p in enumerate(TAX.names):
            assert D[i, j] == _formula(s, p, TAX.exceptions), (s, p)


def test_exception_is_own_leaf():
    # Caridea is not an ancestor of Pandalus amplus: the exception adds an edge.
    lin_c, lin_p = TAX.lineages[TAX.index("Caridea")], TAX.lineages[TAX.index("Pandalus amplus")]
    assert distance(lin_p, lin_c, False, True, False) == d("Pandalus amplus", "Caridea")
    assert d("Caridea", "Pandalus amplus") == 1 + 3  # exception edge + family, genus, species


def _frames(pairs):
    sol = pd.DataFrame({"annotation_id": [i for i, _, _ in pairs], "concept_name": [s for _, s, _ in pairs]})
    sub = pd.DataFrame({"annotation_id": [i for i, _, _ in pairs], "concept_name": [p for _, _, p in pairs]})
    return sol, sub


def test_score_joins_on_id_not_position():
    sol, sub = _frames([(1, "Sebastes", "Sebastes diploproa"), (2, "Caridea", "Heterocarpus")])
    mean, per_row = score_frames(sol, sub.iloc[::-1].reset_index(drop=True), TAX)
    assert mean == pytest.approx(2.0)
    assert list(per_row["distance"]) == [1, 3]


def test_unknown_name_scores_12_with_warning():
    sol, sub = _frames([(1, "Sebastes", "Not a fish"), (2, "Sebastes", "Sebastes")])
    with pytest.warns(UserWarning, match="not known concepts"):
        mean, _ = score_frames(sol, sub, TAX)
    assert mean == 6.0


def test_missing_and_extra_ids_are_one_error():
    sol, sub = _frames([(1, "Sebastes", "Sebastes"), (2, "Sebastes", "Sebastes")])
    sub = pd.DataFrame({"annotation_id": [1, 3, 4], "concept_name": ["Sebastes"] * 3})
    with pytest.raises(MetricError, match=r"1 solution ids missing .*2 submission ids not in the solution"):
        score_frames(sol, sub, TAX)


def test_cli_prints_score_and_writes_per_row(tmp_path, capsys):
    sol, sub = _frames([(1, "Sebastes", "Sebastes diploproa"), (2, "Holothuroidea", "Scotoplanes globosa")])
    sol.to_csv(tmp_path / "sol.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert main([str(tmp_path / "sol.csv"), str(tmp_path / "sub.csv"), "--per-row", str(tmp_path / "rows.csv")]) == 0
    assert "score 2.5000 over 2 annotations" in capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert list(rows.columns) == ["annotation_id", "solution", "submission", "distance"]
    assert list(rows["distance"]) == [1, 4]


def test_cli_error_exit_code(tmp_path):
    sol, _ = _frames([(1, "Sebastes", "Sebastes")])
    sol.to_csv(tmp_path / "sol.csv", index=False)
    pd.DataFrame({"annotation_id": [5], "concept_name": ["Sebastes"]}).to_csv(tmp_path / "sub.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "lib.decide.metric", str(tmp_path / "sol.csv"), str(tmp_path / "sub.csv")],
                       capture_output=True, text=True, cwd=str(DEFAULT_TAXONOMY.parents[2]))
    assert r.returncode == 2
    assert "1 solution ids missing" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text,problem", [
    ("", "is empty; write the header annotation_id,concept_name"),
    ("\n\n", "is empty; write the header annotation_id,concept_name"),
    ('annotation_id,concept_name\n1,"Sebastes\n', "is not a well-formed CSV (EOF inside string starting at row 1); fix that line"),
    (b"\xff\xfe\x00annotation_id", "is not UTF-8 text"),
])
@pytest.mark.parametrize("which", ["solution", "submission"])
def test_cli_unparsable_csv_is_one_sentence_naming_the_file(tmp_path, capsys, text, problem, which):
    files = {"solution": tmp_path / "sol.csv", "submission": tmp_path / "sub.csv"}
    for path in files.values():
        path.write_text("annotation_id,concept_name\n1,Sebastes\n")
    bad = files[which]
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main([str(files["solution"]), str(files["submission"])]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: The {which} file '{bad}' {problem}"), err
