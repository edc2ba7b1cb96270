"""`cslm plan`: will a layout fit, and which layout trains fastest, before anything is launched.

Modules, one concern each:
    gpus      the accelerator table (memory, dense peaks, bandwidths)
    params    the parameters one rank owns, in megatron-core's order, at a TP/PP position
    memory    bytes per rank: weights, gradients, optimizer state (megatron-core's buffers, padding and
              distributed-optimizer sharding reproduced exactly), activations (formula with its source)
    layouts   TP/PP/DP(/VPP) candidates, their step time (FLOPs / (peak x MFU) + communication + bubble)
    report    markdown and JSON

Invariant: weights, gradient and optimizer bytes equal what megatron-core allocates for the same model and
layout, to the byte (tests/test_plan.py builds the model under 4 gloo processes and compares); activation bytes
are a stated formula checked within 10% against the tensors autograd saves on CPU.
"""
