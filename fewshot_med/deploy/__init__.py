"""What leaves the toolkit: the deployable classifier (backbone, adapted method, temperature)."""

from fewshot_med.deploy.classifier import FewShotClassifier, fit_classifier

__all__ = ["FewShotClassifier", "fit_classifier"]
