"""`scaletrain bench`: our training step vs the peer (transformers' LlamaForCausalLM + the same
DeepSpeed config) in one invocation, plus attention and loss-memory microbenchmarks.

  machine.py      what the numbers were measured on (CPU model, AMX, versions)
  spawn.py        start N ranks (torch.multiprocessing + the same process-group setup as training)
  models.py       build ours (the trainer's own builders) and the peer at one shape
  training.py     the alternating timed steps, MFU, peak memory per rank
  attention.py    fwd+bwd of each attention backend vs eager (--attention-only)
  loss_memory.py  peak memory of the loss with and without train.loss_chunk (--loss-memory)
"""
