"""Test-wide settings: never touch the network; run Triton kernels in the interpreter without a GPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, so it must be set before esa.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
