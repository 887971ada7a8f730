"""Training loops: supervised base-class pretraining (pretrain.py) and episodic meta-training (meta.py)."""
