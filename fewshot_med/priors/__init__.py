"""Informative priors from pretraining: posteriors over the backbone's weights, for Bayesian transfer."""

from fewshot_med.priors.gaussian import L2SPPrior, SwagPrior
from fewshot_med.priors.swag import VARIANCE_FLOOR, SwagCollector, SwagPosterior

__all__ = ["VARIANCE_FLOOR", "L2SPPrior", "SwagCollector", "SwagPosterior", "SwagPrior"]
