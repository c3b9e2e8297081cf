"""GPT-2 as a frozen TensorFlow graph: checkpoints, tokenizer, generation graph, export and safe loading."""

import os

# TensorFlow's default CPU allocator returns large buffers (the KV cache, the logits) to the OS after every
# Session.run, so the next run page-faults them in again: 2.2 million minor faults per run at batch 64, prompt
# 128, 16% of CPU time in the kernel. Its BFC pool keeps them (2.4 thousand faults, +19-22% tokens/s there;
# BENCHMARKS.md attempt 11). TensorFlow reads this when it creates its CPU device, so it is set on importing
# this package, before any Session; an explicit setting in the environment wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
