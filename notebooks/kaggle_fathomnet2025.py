# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # FathomNet 2025: the staged pipeline in a Kaggle notebook
#
# The same stages as `make stages` (00 prepare, 01 train folds, 02 pseudo-labels, 03 retrain, 04 blend and
# submit, the kNN baseline), run from this repository wherever it is attached, with their progress bars.
#
# **Attach** (Add Input): the competition data (or a dataset holding its JSON files and frames), this
# repository as a dataset, and, offline, a dataset of wheels for `requirements.txt`. Set the parameters
# below and *Run All*. Each stage writes a record when it finishes and prints `up to date` when nothing
# it reads has changed, so running everything again after an interruption continues where it stopped.
#
# The cell below holds every parameter (it is tagged `parameters`, so papermill can set them too).

# %% tags=["parameters"]
REPO_DIR = "/kaggle/input/fathomnet-pipeline"  # this repository, attached as a dataset (read-only is fine)
CONFIG = "configs/fathomnet2025.yaml"  # relative to REPO_DIR, or an absolute path
DATA_ROOT = "/kaggle/input/fathomnet-2025"  # dataset_train.json, dataset_test.json, train/images/, test/images/
OUTPUT_ROOT = "/kaggle/working/output"  # writable; OUTPUT_ROOT/<exp>/ holds every stage's folder
OVERRIDES: list[str] = []  # dotted config overrides, e.g. ["train.epochs=3", "model.pretrained=file", "model.pretrained_file=/kaggle/input/w/w.pth"]
OFFLINE = False  # True: install from WHEELS_DIR only (a notebook without internet)
WHEELS_DIR = "/kaggle/input/fathomnet-wheels"  # the wheels dataset (see "Offline" at the end)
INSTALL = True  # False when the environment already has requirements.txt
KEEP_IMAGE = True  # install requirements-kaggle.txt with Kaggle's own torch, torchvision, numpy and OpenCV pinned (False: requirements.txt)
DOWNLOAD = False  # True (internet on): 00 downloads missing frames from each image's coco_url
RESUME_FROM = ""  # an earlier session's output_root, attached as a dataset ("" = start from OUTPUT_ROOT as it is)
MAKE_DEMO = False  # True: first generate the synthetic demo data into DATA_ROOT (with CONFIG = "configs/demo.yaml")
RUN_KNN = True  # also the kNN baseline (its own CV and submission)
SUBMISSION_OUT = "/kaggle/working/submission.csv"  # where Kaggle's "Submit" picks the file up
UPLOAD = False  # True: upload with the kaggle CLI (python -m lib.kaggle.submit); needs internet and an API token
TIME_STAGES = False  # True: the doctor also measures the config's steps here (about 10 s) and prints each stage's expected time

# %% [markdown]
# ## Setup
# The repository's scripts run with the repository as their working directory and with this notebook's
# Python; paths handed to them are made absolute here, so this notebook's own directory does not matter.

# %%
import sys
from pathlib import Path

from IPython.display import Image, Markdown, display

REPO = Path(REPO_DIR).resolve()
sys.path.insert(0, str(REPO))
from lib.kaggle import notebook as nb  # standard library only: importable before the installs

OUT = Path(OUTPUT_ROOT).resolve()
DATA = nb.data_root(Path(DATA_ROOT).resolve(), download=DOWNLOAD, writable=OUT.parent / "data")
run = nb.Run(REPO, CONFIG, (f"data.root={DATA}", f"output_root={OUT}", *OVERRIDES))
print("repository:", REPO, "| config:", run.config_path, "| data:", DATA, "| output:", OUT)

# %%
if INSTALL:
    nb.install(REPO, offline=OFFLINE, wheels_dir=WHEELS_DIR, keep_image=KEEP_IMAGE)

# %%
from lib.config import load_config

cfg = load_config(run.config_path, list(run.overrides))  # a bad key or value stops here, in one sentence
EXP_DIR = cfg.out_dir
print(f"experiment {cfg.exp}: {EXP_DIR}")

# %% [markdown]
# ## Resume, demo data, environment check

# %%
if RESUME_FROM:
    nb.resume(Path(RESUME_FROM), OUT, cfg.exp)
if MAKE_DEMO:
    run.module("lib.demo")
run.doctor(*(["--time"] if TIME_STAGES else []))  # python -m lib.doctor: stops here on a fatal problem (e.g. no GPU for train.device cuda)

# %% [markdown]
# ## The stages
# One cell per stage: rerun one after changing `OVERRIDES` (and the setup cells) and the records decide
# what is redone: changing `train.epochs` reruns 01 and what reads it, changing `submit.decode` only 04.
# With two GPUs (Accelerator: GPU T4 x2), 01 and 03 train the folds on both, one process per GPU with its own
# folds (their lines prefixed `[gpu 0]`, `[gpu 1]`); `OVERRIDES = ["train.multi_gpu=none"]` keeps one.

# %%
run.stage("00_prepare_data.py", *(["--download"] if DOWNLOAD else []))

# %%
run.stage("01_train_folds.py")

# %%
run.stage("02_pseudo_label.py")

# %%
run.stage("03_retrain.py")

# %%
run.stage("04_infer_submit.py")

# %%
if RUN_KNN:
    run.stage("knn_baseline.py")

# %% [markdown]
# ## Results
# The CV table (`python -m lib.report`), 04's report, the training curves of every fold and the UMAP of
# the test embeddings with their pseudo-labels.

# %%
run.module("lib.report")

# %%
display(Markdown((EXP_DIR / "04_submit" / "report.md").read_text()))

# %%
for png in sorted(EXP_DIR.glob("0[13]_*/fold_*/curves.png")):
    print(png.relative_to(EXP_DIR))
    display(Image(filename=str(png)))

# %%
umap = EXP_DIR / "02_pseudo" / "umap.png"
if umap.is_file():
    display(Image(filename=str(umap)))

# %% [markdown]
# ## Submission
# 04's `submission.csv` is copied to `/kaggle/working/submission.csv`, where the notebook's *Submit*
# button finds it. With `UPLOAD = True` it is also uploaded here by the official kaggle CLI, after being
# checked again against the test JSON, with a message naming the experiment, models, blend, decoding and
# CV, and logged in `<exp>/submissions.csv`. For the token, add the Kaggle secrets `KAGGLE_USERNAME` and
# `KAGGLE_KEY` (Add-ons > Secrets) and, before this cell:
# `from kaggle_secrets import UserSecretsClient; import os; s = UserSecretsClient();`
# `os.environ.update(KAGGLE_USERNAME=s.get_secret("KAGGLE_USERNAME"), KAGGLE_KEY=s.get_secret("KAGGLE_KEY"))`.

# %%
nb.copy_submission(EXP_DIR, Path(SUBMISSION_OUT).resolve())
if UPLOAD:
    run.module("lib.kaggle.submit")
else:
    run.module("lib.kaggle.submit", "--dry-run")  # what UPLOAD = True would send

# %% [markdown]
# ## Resuming in a new session
# A Kaggle session ends (12 hours, or an idle timeout) with `/kaggle/working` kept only in a saved version.
# To carry on where it stopped:
# 1. Keep `OUTPUT_ROOT` as a dataset: a version saved with *Save & Run All (Commit)* runs the notebook in
#    the background and keeps `/kaggle/working` as that version's output; or download the folder and
#    upload it as a dataset (`kaggle datasets create -p <folder>`, later `kaggle datasets version -p <folder> -m ...`).
# 2. In the new session, *Add Input*: that notebook version's output (or the dataset). It appears
#    read-only under `/kaggle/input/<name>/`.
# 3. Set `RESUME_FROM` to the attached folder that holds `<exp>/` (or `output/<exp>/`) and *Run All*:
#    the copy goes to the writable `OUTPUT_ROOT`, finished stages and folds print `up to date`, and a
#    fold killed mid-run resumes from its `last.pt` at the start of the epoch it was in.
#
# `last.pt` files are not needed once a stage has finished: delete them before saving to keep the
# dataset small (`find /kaggle/working/output -name last.pt -delete`).
#
# ## Offline
# With the internet off, `OFFLINE = True` installs from `WHEELS_DIR` with
# `pip install --no-index --find-links WHEELS_DIR -r requirements-kaggle.txt -c <the image's versions>`: Kaggle's own
# torch, torchvision, numpy and OpenCV are pinned to what the image has, so neither route can replace them. Build the
# wheels on a machine with internet and Kaggle's Python version: `pip download -r requirements-kaggle.txt -d wheels`,
# and upload the folder as a dataset. Offline, the backbone's weights come from a file too:
# `OVERRIDES = ["model.pretrained=file", "model.pretrained_file=/kaggle/input/<weights>/<file>.pth"]`.
# Full-resolution frames are large: a dataset that already holds them beats `DOWNLOAD = True` into the
# 20 GB of `/kaggle/working`.
