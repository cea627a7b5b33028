"""Kaggle tools beside the pipeline: the notebook's helpers (notebook) and the upload of submission.csv (submit).

A tool layer like lib/demo: it reads what the stages wrote and never decides anything a stage records.
"""
