"""Worker (run under torchrun, or plain python for one process): per-sample SDPA attention vs the dense
block-diagonal mask on packed bins, same weights, fp32; prints RESULT{json} of the largest differences."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_cslm.data.packing import block_causal_mask, packed_seq_params
from megatron_cslm.distributed import parallel
from megatron_cslm.models import llama as M
from megatron_cslm.models.attention import bin_packed_seq_params

tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
device = os.environ.get("CSLM_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh: cuda (TP=1)
parallel.initialize(parallel.ParallelConfig(tensor_model_parallel_size=tp), device=device, seed=7)
arch = M.ARCHS["tiny"]
padded = M.padded_vocab_size(arch.vocab_size, tp)
models = {}
for spec in ("local_mask", "local"):
    parallel.seed_everything(7)  # use_cpu_initialization: identical full weights, split by TP
    cfg = M.transformer_config(arch, tensor_parallel_size=tp, spec=spec, precision=M.PrecisionConfig(dtype="fp32"))
    models[spec] = M.build_gpt_model(arch, cfg, padded_vocab=padded, spec=spec)
ref, new = models["local_mask"], models["local"]
new.load_state_dict(ref.state_dict())
assert type(new.decoder.layers[0].self_attention.core_attention).__name__ == "SampleSDPAttention"

s = 160
cu = torch.tensor([[0, 37, 90, 131, 160, 160], [0, 64, 150, 160, 160, 160]], dtype=torch.int32)  # + pad tails
gen = torch.Generator().manual_seed(0)
tokens = torch.randint(0, arch.vocab_size, (2, s), generator=gen)
positions = torch.arange(s).expand(2, s)
labels = torch.randint(0, arch.vocab_size, (2, s), generator=gen)
if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    cu, tokens, positions, labels = (t.cuda() for t in (cu, tokens, positions, labels))
out = {}
for name, model, kwargs in (("mask", ref, {"attention_mask": block_causal_mask(cu, s)}),
                            ("sample", new, {"attention_mask": None,
                                             "packed_seq_params": bin_packed_seq_params(cu)})):
    with torch.no_grad():
        logits = model(tokens, positions, **kwargs)
        logits = logits.masked_fill(torch.isinf(logits), 0.0)  # vocabulary padding rows are -inf by design
    model(tokens, positions, labels=labels, **kwargs).mean().backward()  # per-token CE -> its mean
    out[name] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()})
diff_logits = (out["mask"][0] - out["sample"][0]).abs().max()
diff_grads = max((out["mask"][1][n] - g).abs().max() for n, g in out["sample"][1].items())
with torch.no_grad():  # the same model without packed params attends across samples: must differ
    crossed = new(tokens, positions, None)
    crossed = (crossed.masked_fill(torch.isinf(crossed), 0.0) - out["mask"][0]).abs().max()
    # TE's layout (bins flattened, flat cu_seqlens, RoPE positions restarting per sample) on the same module:
    # equal up to RoPE's relative-position invariance in fp32
    thd = new(tokens.reshape(1, -1), positions.reshape(1, -1), None, packed_seq_params=packed_seq_params(cu))
    thd = (thd.masked_fill(torch.isinf(thd), 0.0).reshape(out["mask"][0].shape) - out["mask"][0]).abs().max()
stats = torch.tensor([float(diff_logits), float(diff_grads), float(crossed), float(thd)], dtype=torch.float64,
                     device=tokens.device)
dist.all_reduce(stats, op=dist.ReduceOp.MAX)
if dist.get_rank() == 0:
    print("RESULT" + json.dumps({"logits": stats[0].item(), "grads": stats[1].item(),
                                 "crossed": stats[2].item(), "thd": stats[3].item(),
                                 "params": len(out["sample"][1])}))
parallel.destroy()
