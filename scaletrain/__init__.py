"""scaletrain: pre-train and grow Llama-style language models with DeepSpeed."""

__version__ = "0.1.0"
