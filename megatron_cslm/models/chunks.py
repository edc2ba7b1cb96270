"""This rank's model chunks without DDP, and their full-vocabulary logits: what training, the converters'
`--verify` and the parallel-parity checks share.

Why here (models/, not training/): the converters and evaluation build and run the model too, and must not
import the trainer (layering: tests/test_layering.py). Invariants: one chunk, or
`config.virtual_pipeline_model_parallel_size` chunks (chunk i holds virtual stage i, with global checkpoint
keys); chunks live on the current CUDA device when there is one, else on the CPU; `forward_logits` returns
float32 logits on the last pipeline stage only.
"""
from __future__ import annotations

import torch

from megatron_cslm.distributed.batch import get_batch
from megatron_cslm.models.llama import LlamaArch, build_gpt_model


def build_model_chunks(arch: LlamaArch, config, padded_vocab: int, spec: str | None = None) -> list:
    """This rank's GPTModel chunks (no DDP wrapper, no optimizer hooks)."""
    vpp = config.virtual_pipeline_model_parallel_size
    models = [build_gpt_model(arch, config, padded_vocab=padded_vocab, spec=spec, vp_stage=stage)
              for stage in (range(vpp) if vpp else [None])]
    if torch.cuda.is_available():
        for model in models:
            model.cuda(torch.cuda.current_device())
    return models


@torch.no_grad()
def forward_logits(model: list, batches: list[dict], seq_length: int, micro_batch_size: int) -> list[torch.Tensor]:
    """Full-vocabulary logits of each micro-batch, returned on the last pipeline stage ([] elsewhere).

    Used to check parallel layouts and converted checkpoints against references.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(data_iterator, chunk):
        batch = get_batch(data_iterator)
        output = chunk(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                       packed_seq_params=batch.get("packed_seq_params"))
        # clone: the schedule scales the returned tensor in place, and TP=1 "gathers" by identity
        return output, lambda out: (out, {"logits": gather_from_tensor_model_parallel_region(out).clone()})

    for chunk in model:
        chunk.eval()
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    return [x["logits"].float() for x in out]
