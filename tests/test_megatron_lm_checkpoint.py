"""Issue 15: checkpoints interoperate with Megatron-LM itself, not with our idea of it.

megatron-core 0.19's wheel ships Megatron-LM's `megatron.training`; on that CI leg this test
1. writes a Llama checkpoint with Megatron-LM's own argument parser, model path (`core_transformer_config_from_args`
   + GPTModel with the local spec) and `save_checkpoint` (CPU, gloo, our cpu_mode);
2. gives it to `python -m megatron_cslm.pretrain --load-init` without a cslm_model.json: the architecture comes
   from the args in its common state, and the weights our trainer saves at iteration 0 equal Megatron-LM's;
3. loads that checkpoint of ours with Megatron-LM's `load_checkpoint` (`--load ... --finetune`) into Megatron-LM's
   model: every parameter equals what Megatron-LM saved.
The file is also its own worker script (`--save-mlm` / `--load-mlm`), run in a fresh process each time because
Megatron-LM keeps global args.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _megatron_lm_argv(tokenizer: str, vocab_size: int, **paths: str) -> list[str]:
    from megatron_cslm.models.llama import ARCHS

    arch = ARCHS["tiny"]
    argv = ["pretrain_gpt.py", "--num-layers", arch.num_layers, "--hidden-size", arch.hidden_size,
            "--ffn-hidden-size", arch.ffn_hidden_size, "--num-attention-heads", arch.num_attention_heads,
            "--group-query-attention", "--num-query-groups", arch.num_query_groups,
            "--max-position-embeddings", arch.max_position_embeddings, "--seq-length", 64,
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--rotary-base", 500000,
            "--use-rope-scaling", "--rope-scaling-factor", 8, "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--transformer-impl", "local", "--ckpt-format", "torch_dist",
            "--micro-batch-size", 1, "--global-batch-size", 1, "--train-iters", 1, "--lr", 1e-4, "--save-interval", 1,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--vocab-size", vocab_size,
            "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-bias-swiglu-fusion",
            "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",  # CPU: no fusions
            "--no-save-optim", "--no-save-rng", "--seed", 7]
    for flag, value in paths.items():
        argv += [f"--{flag}", value]
    return [str(a) for a in argv]


def _megatron_lm_model(argv: list[str]):
    """Megatron-LM's own args -> TransformerConfig -> GPTModel (local spec), as pretrain_gpt.py builds it."""
    sys.argv = argv
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    from megatron_cslm.distributed import parallel

    parallel.initialize(parallel.ParallelConfig(), device="cpu", seed=7)
    args = parse_args()
    args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args)
    validate_args(args, {})
    set_global_variables(args, build_tokenizer=False)
    model = GPTModel(config=core_transformer_config_from_args(args),
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
                     rope_scaling_factor=args.rope_scaling_factor, share_embeddings_and_output_weights=False)
    return args, model


def _worker(mode: str, out: str, tokenizer: str, vocab_size: int, other: str | None = None) -> None:
    import torch
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint

    if mode == "--save-mlm":
        _, model = _megatron_lm_model(_megatron_lm_argv(tokenizer, vocab_size, save=out))
        save_checkpoint(1, [model], None, None, 0)
        torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k},
                   Path(out) / "weights.pt")
    else:  # --load-mlm: our checkpoint `out` with Megatron-LM's loader, Megatron-LM's `other` for reference
        _, model = _megatron_lm_model(_megatron_lm_argv(tokenizer, vocab_size, load=out, save=out + "_unused")
                                      + ["--finetune", "--no-load-optim", "--no-load-rng"])
        iteration, _ = load_checkpoint([model], None, None, strict=True)
        saved = torch.load(Path(other) / "weights.pt", weights_only=True)
        params = dict(model.state_dict())
        differ = [k for k, v in saved.items() if not torch.equal(params[k], v)]
        result = {"iteration": iteration, "compared": len(saved), "differ": differ}
        (Path(out) / "mlm_load.json").write_text(json.dumps(result))


def _run(*args, timeout=500):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29700 + os.getpid() % 200)}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.timeout(1200)
def test_megatron_lm_checkpoints_load_both_ways(toy_pretrain, tmp_path):
    pytest.importorskip("megatron.training.checkpointing",
                        reason="megatron.training ships with megatron-core >= 0.19 (CI's Python 3.12 leg)")
    import torch

    from megatron_cslm.checkpoint.manifest import MANIFEST, ModelManifest
    from megatron_cslm.convert.dist_ckpt import DistCheckpointReader

    tokenizer, vocab = toy_pretrain["tokenizer"], toy_pretrain["vocab_size"]
    mlm, ours = tmp_path / "megatron_lm", tmp_path / "ours"
    _run(Path(__file__).relative_to(ROOT), "--save-mlm", mlm, tokenizer, vocab)
    assert (mlm / "latest_checkpointed_iteration.txt").read_text().strip() == "1" and not (mlm / MANIFEST).exists()

    # Megatron-LM's checkpoint -> our trainer (--load-init, architecture from its args) -> our checkpoint
    out = _run("-m", "megatron_cslm.pretrain", "--device", "cpu", "--load-init", mlm, "--train-iters", "0",
               "--save", ours, "--data-path", toy_pretrain["prefixes"]["asr"], "--seq-length", "64",
               "--global-batch-size", "1", "--data-cache-path", tmp_path / "cache")
    assert f"initialised weights from {mlm} (iteration 1)" in out
    manifest = ModelManifest.load(ours)
    assert (manifest.arch.num_layers, manifest.arch.hidden_size, manifest.arch.num_query_groups) == (4, 64, 2)
    assert manifest.arch.vocab_size == vocab and manifest.lineage[0]["stage"] == "megatron-lm"
    theirs_reader, ours_reader = DistCheckpointReader(mlm / "iter_0000001"), DistCheckpointReader(ours / "iter_0000000")
    model_keys = [k for k, m in theirs_reader.metadata.state_dict_metadata.items()
                  if hasattr(m, "size") and k.split(".")[0] in ("embedding", "decoder", "output_layer")]
    assert len(model_keys) == 9  # embedding, output layer, final norm, 6 layer tensors stacked over layers
    for key in model_keys:  # same sharded keys, same global shapes, same values
        size = list(theirs_reader.tensor_meta(key).size)
        assert list(ours_reader.tensor_meta(key).size) == size, key
        region = {key: ([0] * len(size), size)}
        assert torch.equal(theirs_reader.read(region)[key], ours_reader.read(region)[key]), key

    # our checkpoint -> Megatron-LM's own loader (--load --finetune) -> Megatron-LM's model
    _run(Path(__file__).relative_to(ROOT), "--load-mlm", ours, tokenizer, vocab, mlm)
    result = json.loads((ours / "mlm_load.json").read_text())
    assert result["compared"] >= 10 and result["differ"] == [], result


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *(sys.argv[5:6]))
