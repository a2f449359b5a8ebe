"""Training data: manifests (``manifest``), the order stories are drawn in (``order``), the
decoding loader (``loader``), the dataset jobs (``synth``, ``filter``, ``precompute``) and
precomputed latents (``latents``, ``shard_encoder``).

Import the modules themselves: this package re-exports nothing, so ``python -m
trainer.data.manifest`` does not import torch.
"""
