"""Pseudo-label selection from a fold ensemble's test probabilities."""
from __future__ import annotations

import numpy as np
import pandas as pd


def select_confident(annotation_ids: np.ndarray, probs: np.ndarray, threshold: float) -> pd.DataFrame:
    """Rows whose ensemble top probability reaches `threshold`; the weight is that probability."""
    top = probs.max(1)
    keep = top >= threshold
    return pd.DataFrame(
        {
            "annotation_id": np.asarray(annotation_ids)[keep],
            "label": probs.argmax(1)[keep],
            "weight": top[keep].astype(float),
            "source": "confidence",
        }
    )
