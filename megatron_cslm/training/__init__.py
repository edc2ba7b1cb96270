"""The training loop shared by continual pretraining (`megatron_cslm.pretrain`) and SFT (`megatron_cslm.sft`)."""
