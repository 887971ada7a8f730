"""The MLflow pyfunc wrapper of a ``FewShotClassifier`` (imports mlflow, so it is loaded on demand)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from fewshot_med.deploy.classifier import FewShotClassifier


class ClassifierModel(PythonModel):
    """``predict(images)``: ``(N, H, W, C)`` uint8 images -> a table of class probabilities and the
    predicted class (column ``prediction``)."""

    def __init__(self, classifier: FewShotClassifier) -> None:
        self.classifier = classifier

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Calibrated probabilities, one column per class, plus ``prediction``."""
        probs = self.classifier.predict_proba(np.asarray(model_input))
        table = pd.DataFrame(probs, columns=list(self.classifier.class_names))
        table["prediction"] = np.asarray(self.classifier.class_names)[probs.argmax(axis=1)]
        return table
