"""Adversarial robustness of adapted few-shot models: attacks, the adapted module, the stage."""
