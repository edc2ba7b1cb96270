"""The FLOPs formula (training log MFU and bench/flops.py) agrees with the real model's matmul parameters."""
from megatron_cslm.models.flops import forward_flops_per_token, mfu, train_flops_per_token
from megatron_cslm.models.llama import ARCHS


def test_forward_flops_are_two_per_matmul_weight_plus_attention():
    arch = ARCHS["llama3.1-8b"]
    h, L, v = arch.hidden_size, arch.num_layers, 132480
    kv = arch.num_query_groups * arch.head_dim
    matmul_weights = L * (h * (h + 2 * kv) + h * h + 3 * h * arch.ffn_hidden_size) + h * v
    # Meta's Llama-3.1-8B has 8,030,261,248 parameters = matmul weights + input embedding + norms
    base = matmul_weights - h * (v - 128256)
    assert base + h * 128256 + (2 * L + 1) * h == 8_030_261_248
    seq = 1024
    assert forward_flops_per_token(arch, seq, v) == 2 * matmul_weights + 2 * 2 * L * seq * h
    assert train_flops_per_token(arch, seq, v) == 3 * forward_flops_per_token(arch, seq, v)
    assert train_flops_per_token(arch, seq, v, full_recompute=True) == 4 * forward_flops_per_token(arch, seq, v)


def test_mfu_of_a_known_throughput():
    # 989 TFLOP/s peak; 10 TFLOP/token at 9.89 tokens/s is exactly 10% of peak
    assert abs(mfu(9.89, 10e12, 989.0) - 0.1) < 1e-12


def test_cpu_mfu_is_taken_against_the_measured_matmul_peak_not_a_gpus():
    from megatron_cslm.training.profiling import device_peak_tflops

    peak, source = device_peak_tflops("cpu")
    assert "measured CPU" in source
    # A 2-core CPU reaches tens to hundreds of GFLOP/s in fp32, never an H100's 989 TFLOP/s.
    assert 1e-4 < peak < 50.0
