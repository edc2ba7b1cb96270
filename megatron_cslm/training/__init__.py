"""The training loop shared by continual pretraining (`training/pretrain.py`) and SFT (`training/sft.py`)."""
