"""Model selection without a validation set: Bayesian logistic regression under the Laplace
approximation on frozen features, and the criteria that rank candidate configurations from the
support set alone (conditional and plain marginal likelihood, leave-one-out, training loss)."""
