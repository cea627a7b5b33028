#!/usr/bin/env bash
# One SLURM array task per fold, then one dependent job that writes the stage record with the CV score.
#
#   sbatch --array=0-4 scripts/slurm_folds.sh configs/fathomnet2025.yaml 01_train_folds.py [key=value ...]
#   # when the array is done (or chain it: sbatch --dependency=afterok:<array job id> ...):
#   .venv/bin/python 01_train_folds.py --config configs/fathomnet2025.yaml [key=value ...]
#
# Folds already done are skipped by their records, so resubmitting the array after a failure
# redoes only what is missing; a killed fold resumes from its last.pt.
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
exec .venv/bin/python "$SCRIPT" --config "$CONFIG" --fold "${SLURM_ARRAY_TASK_ID:?run this with sbatch --array}" "$@"
