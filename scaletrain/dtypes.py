"""The config's precision names (`train.precision`, bench and export flags) as torch dtypes."""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
