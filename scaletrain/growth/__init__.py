"""Function-preserving growth of Llama-style models, on plain state dicts (HF key names).

`plan` validates shapes and yields per-tensor recipes; `width` and `depth` hold the index maps;
`optimizer_state` maps Adam moments with the same maps.

Using them on real checkpoints, streaming (one parent tensor in, one child tensor out):
`parent` + `ds_reader` read a parent by name (safetensors, or any ZeRO stage's shards incl. Adam moments),
`offline` writes a child checkpoint dir (`scaletrain grow`), `check` compares parent and child one block at
a time; inside a run `schedule` (growth.schedule), `in_run` (the boundary sequence) and `engine_state`
(grown masters/moments into a fresh DeepSpeed engine, freeing the old one).

Nothing is imported here: config validation reads `schedule`, which must not pull in torch.
"""
