"""What leaves the toolkit: the deployable classifier (backbone, adapted method, temperature) and the
preprocessing that lets it read files."""

from fewshot_med.deploy.classifier import FewShotClassifier, fit_classifier
from fewshot_med.deploy.preprocess import Preprocessing, load_inputs

__all__ = ["FewShotClassifier", "Preprocessing", "fit_classifier", "load_inputs"]
