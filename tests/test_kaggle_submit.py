"""python -m lib.kaggle.submit: the file checked again, a message naming the run, the official CLI called, the upload logged.

A fake `kaggle` executable on PATH records its arguments; the run is a miniature output folder
(04's record and submission.csv, 01 and 03's records, a test JSON), so no stage runs here.
"""
import csv
import json
import os
import sys

import pytest

from lib.core.io import sha256_bytes
from lib.kaggle.submit import main

NAMES = ["Asteroidea", "Sebastes", "Octopus rubescens"]
IDS = [5, 3, 9]
GOOD = "annotation_id,concept_name\n5,Asteroidea\n3,Sebastes\n9,Sebastes\n"
CREDENTIAL_VARS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME")


def write_record(folder, result, outputs=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps({"fingerprint": {}, "result": result, "outputs": outputs or {}}))


def write_submission(out, text, vouched=True):
    """04's submission.csv and its record, which vouches for exactly these bytes (or, vouched=False, for GOOD's)."""
    (out / "04_submit").mkdir(parents=True, exist_ok=True)
    (out / "04_submit" / "submission.csv").write_text(text)
    meta = text if vouched else GOOD
    result = {"rows": 3, "fallbacks": 0, "models": ["phase1", "phase2"], "weights": [0.3, 0.7], "blend": "cv",
              "decode": "min_risk", "oof_distance_min_risk": 1.2345}
    write_record(out / "04_submit", result, {"submission.csv": {"size": len(meta), "sha256": sha256_bytes(meta.encode())}})


@pytest.fixture
def run(tmp_path):
    """A finished run in miniature; yields the command-line arguments that name it and its experiment folder."""
    data = tmp_path / "data"
    data.mkdir()
    test_json = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}],
                 "annotations": [{"id": i, "image_id": 1, "bbox": [0, 0, 10, 10]} for i in IDS],
                 "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
    (data / "dataset_test.json").write_text(json.dumps(test_json))
    out = tmp_path / "out" / "x"
    write_submission(out, GOOD)
    write_record(out / "01_train", {"cv_distance": 1.5, "cv_top1": 0.4})
    write_record(out / "03_retrain", {"cv_distance": 1.25, "per_round": [{"cv_distance": 1.25}]})
    return ["--config", "configs/demo.yaml", f"data.root={data}", f"output_root={tmp_path / 'out'}", "exp=x"], out


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """A fake kaggle CLI first on PATH (it appends its argv to a file; FAKE_KAGGLE_RC sets its exit code); no token anywhere."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "kaggle_calls.jsonl"
    bin_dir.mkdir()
    script = bin_dir / "kaggle"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      "print('Successfully submitted to FathomNet 2025')\nsys.exit(int(os.environ.get('FAKE_KAGGLE_RC', '0')))\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    return calls


def uploads(calls):
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.is_file() else []


def one_sentence(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_uploads_with_a_message_naming_the_run_and_logs_each_upload(run, kaggle, monkeypatch, capfd):
    args, out = run
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert main(args) == 0
    [argv] = uploads(kaggle)
    path = out / "04_submit" / "submission.csv"
    assert argv[:6] == ["competitions", "submit", "-c", "fathomnet-2025", "-f", str(path)] and argv[6] == "-m"
    assert argv[7] == ("x: phase1 + phase2, cv blend (0.30/0.70), min_risk decoding; CV distance 1.2345 "
                       "(phase1 1.5000, phase2 1.2500)")
    assert "Successfully submitted" in capfd.readouterr().out  # the CLI's own output, shown as it came
    assert main([*args, "--competition", "other-comp", "--message", "second try"]) == 0
    assert uploads(kaggle)[1][3] == "other-comp" and uploads(kaggle)[1][7].endswith(" | second try")
    with open(out / "submissions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["competition"] for r in rows] == ["fathomnet-2025", "other-comp"]
    assert all(r["sha256"] == sha256_bytes(GOOD.encode()) and r["file"] == str(path) and r["time"] for r in rows)
    assert rows[0]["message"] == argv[7]


def test_a_kaggle_json_token_is_enough(run, kaggle, tmp_path):
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "me", "key": "secret"}')
    assert main(run[0]) == 0 and len(uploads(kaggle)) == 1


def test_without_a_token_it_says_how_to_set_one_up_and_uploads_nothing(run, kaggle, capsys):
    args, out = run
    assert main(args) == 2
    err = one_sentence(capsys.readouterr().err)
    assert "no Kaggle API token" in err and "~/.kaggle/kaggle.json" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err
    assert not uploads(kaggle) and not (out / "submissions.csv").exists()


def test_without_the_kaggle_command_it_says_how_to_install_it(run, kaggle, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert main(run[0]) == 2
    err = one_sentence(capsys.readouterr().err)
    assert "kaggle command is not on PATH" in err and "pip install kaggle" in err
    assert not uploads(kaggle)


def test_dry_run_prints_the_command_and_uploads_nothing(run, kaggle, capsys):
    args, out = run
    assert main([*args, "--dry-run"]) == 0  # no token needed to see what would be sent
    printed = capsys.readouterr().out
    assert f"kaggle competitions submit -c fathomnet-2025 -f {out / '04_submit' / 'submission.csv'} -m 'x: phase1 + phase2" in printed
    assert "dry run: nothing uploaded" in printed and "no Kaggle API token" in printed
    assert not uploads(kaggle) and not (out / "submissions.csv").exists()


def test_a_file_changed_after_04_wrote_it_is_refused(run, kaggle, monkeypatch, capsys):
    args, out = run
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    write_submission(out, GOOD.replace("9,Sebastes", "9,Asteroidea"), vouched=False)  # valid, but not the bytes 04 recorded
    assert main(args) == 2
    assert "not the file 04's record vouches for" in one_sentence(capsys.readouterr().err)
    assert not uploads(kaggle)


@pytest.mark.parametrize("text,what", [
    ("annotation_id,concept_name\n5,Asteroidea\n3,Sebastes\n", "1 missing ids"),
    (GOOD + "11,Sebastes\n", "1 extra ids"),
    (GOOD.replace("9,Sebastes", "9,Kraken"), "1 unknown names"),
    ("id,concept_name\n5,Asteroidea\n3,Sebastes\n9,Sebastes\n", "expected annotation_id,concept_name"),
])
def test_a_file_that_does_not_fit_the_test_json_is_refused(run, kaggle, monkeypatch, capsys, text, what):
    """Checked again at upload time (the test JSON may have changed since 04 ran), with 04's record vouching for the file."""
    args, out = run
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    write_submission(out, text)
    assert main(args) == 2
    err = one_sentence(capsys.readouterr().err)
    assert what in err and "dataset_test.json" in err and "rerun 04_infer_submit.py" in err and "a bug" not in err
    assert not uploads(kaggle)


def test_without_04s_record_it_says_which_stage_to_run(run, kaggle, capsys):
    args, out = run
    (out / "04_submit" / "record.json").unlink()
    assert main([*args, "--dry-run"]) == 2
    assert "run 04_infer_submit.py" in one_sentence(capsys.readouterr().err)


def test_a_failed_upload_is_not_logged(run, kaggle, monkeypatch, capsys):
    args, out = run
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    monkeypatch.setenv("FAKE_KAGGLE_RC", "1")
    assert main(args) == 2
    assert "kaggle competitions submit failed (exit 1" in capsys.readouterr().err
    assert len(uploads(kaggle)) == 1 and not (out / "submissions.csv").exists()


def test_a_single_model_message_leaves_out_the_weights(run, kaggle):
    from lib.config import load_config
    from lib.kaggle.submit import describe

    args, _ = run
    cfg = load_config("configs/demo.yaml", args[2:])
    msg = describe(cfg, {"models": ["phase1"], "weights": [1.0], "blend": "fit", "decode": "argmax", "oof_distance_argmax": 2.0})
    assert msg == "x: phase1, fit blend, argmax decoding; CV distance 2.0000 (weights fitted on these rows) (phase1 1.5000)"
