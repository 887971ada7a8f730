"""Training loops: supervised base-class pretraining (pretrain.py) and episodic meta-training (meta.py),
sharing checkpoint, best-weights and early-stopping bookkeeping (_harness.py)."""
