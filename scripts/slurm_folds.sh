#!/usr/bin/env bash
# A SLURM array over the folds of a training stage (01_train_folds.py or 03_retrain.py): array task K
# runs `<script> --fold K`. The stage record (with the CV score) is written by one plain run of the
# same script once every fold is done; this script does not submit that run, you do:
#
#   sbatch --array=0-4 scripts/slurm_folds.sh configs/fathomnet2025.yaml 01_train_folds.py [key=value ...]
#   sbatch --dependency=afterok:<array job id> --wrap ".venv/bin/python 01_train_folds.py --config configs/fathomnet2025.yaml [key=value ...]"
#
# The array runs 0..prepare.n_folds-1 (5 folds in fathomnet2025.yaml). Fold runs share the stage's
# lock (each fold is locked alone), so they run side by side but never beside a whole-stage run.
# A fold whose record is current is skipped, so resubmitting the array after a failure redoes only
# what is missing; a killed fold resumes from its last.pt (model, optimiser, EMA, epoch, best
# score, history). PYTHON picks the interpreter (default: the project's .venv/bin/python).
#SBATCH --job-name=folds
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
CONFIG=${1:-configs/fathomnet2025.yaml}
SCRIPT=${2:-01_train_folds.py}
shift $(( $# < 2 ? $# : 2 ))
cd "${SLURM_SUBMIT_DIR:-.}"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-.venv/bin/python}" "$SCRIPT" --config "$CONFIG" --fold "${SLURM_ARRAY_TASK_ID:?run this with sbatch --array}" "$@"
