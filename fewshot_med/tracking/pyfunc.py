"""The MLflow pyfunc wrapper of a ``FewShotClassifier`` (imports mlflow, so it is loaded on demand)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

from fewshot_med.deploy.classifier import FewShotClassifier
from fewshot_med.errors import DataError

#: Input columns: file paths (read where the model runs) or encoded files (PNG, JPEG, DICOM, ...).
PATH_COLUMN = "path"
IMAGE_COLUMN = "image"


class ClassifierModel(PythonModel):
    """``predict(inputs)`` -> ``FewShotClassifier.predict_table``: one probability column per class,
    ``prediction``, ``confidence``, ``abstain`` and ``error``, one row per input.

    Inputs, for a classifier with preprocessing:

    - a DataFrame with one column: ``path`` (file paths), ``image`` (the bytes of encoded files, or
      the same as base64 text, which is how JSON carries bytes; ``mlflow models serve`` decodes a
      base64 ``image`` column itself, as the signature declares it ``binary``), or a single column of
      another name holding paths or bytes (through ``unwrap_python_model().predict``, as the
      signature drops columns it does not name);
    - a numpy array of N images of any size, ``(N, H, W[, C])``, through ``unwrap_python_model()``
      (MLflow's column signature refuses arrays).

    A classifier saved without preprocessing takes ``(N, S, S, C)`` uint8 arrays of the training size.
    """

    def __init__(self, classifier: FewShotClassifier) -> None:
        self.classifier = classifier

    def predict(
        self,
        context: Any,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """The prediction table of ``model_input`` (see the class docstring): a DataFrame, or, called
        on the unwrapped model, an array or list of inputs. The annotation is the one MLflow accepts
        without inferring a schema from it (the signature is logged explicitly)."""
        if isinstance(model_input, pd.DataFrame):
            return self.classifier.predict_table(_items(model_input))
        return self.classifier.predict_table(model_input)


def _items(table: pd.DataFrame) -> list[Any]:
    """The inputs of a one-column table: paths, bytes, or base64 text in an ``image`` column."""
    if IMAGE_COLUMN in table.columns:
        return [_from_base64(value) if isinstance(value, str) else value for value in table[IMAGE_COLUMN]]
    if PATH_COLUMN in table.columns:
        return list(table[PATH_COLUMN])
    if len(table.columns) == 1:
        return list(table.iloc[:, 0])
    raise DataError(
        f"give one column, '{PATH_COLUMN}' (file paths) or '{IMAGE_COLUMN}' (encoded image files, bytes "
        f"or base64); got columns {list(table.columns)}"
    )


def _from_base64(text: str) -> bytes:
    """Decoded base64 text; text that is not base64 is passed on as its bytes, which then fail to
    decode as an image and give that row an error."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error:
        return text.encode()
