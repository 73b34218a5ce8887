"""Hugging Face interop: `import_hf` (an HF model dir -> a scaletrain checkpoint dir), `export_hf` (a run or
checkpoint -> an HF model dir with config.json, safetensors, tokenizer, model card and lineage), the
config.json mapping and the tokenizer files. Weights are read and written through `scaletrain.weights`."""
