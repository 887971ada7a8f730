"""Training loops: supervised base-class pretraining (and episodic meta-training)."""

from fewshot_med.training.pretrain import PretrainResult, epoch_indices, pretrain

__all__ = ["PretrainResult", "epoch_indices", "pretrain"]
