"""fewshot-med: few-shot medical-image diagnosis by transfer, with calibrated, tracked evaluation."""

__version__ = "0.1.0"
