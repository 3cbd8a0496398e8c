"""Speed, and the tools that measure it, as parts a reader finds by name:

speed.py               the speed layer: torch.compile, channels_last, TF32, cudnn.benchmark, fused Adam,
                       each checked on first use and turned off with a recorded reason when it fails
fused_norm.py          InstanceNorm + ReLU as one Triton kernel (fused_norm_kernels.py: the kernels)
profiling.py           torch.profiler's top operators per step, written as a table
benchmark.py           golf-benchmark's training-step measurement (benchmark_data.py: the loaders')
gpu_check.py           the GPU acceptance check (launch/gpu_check.py): every CUDA path run once, measured
"""
