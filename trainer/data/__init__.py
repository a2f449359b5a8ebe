"""What the training worker reads its data with: manifests (``manifest``), the order stories
are drawn in (``order``), the decoding loader (``loader``) and precomputed latents
(``latents``, the format ``datajobs.precompute`` writes). The jobs that make datasets are
in ``datajobs/``.

Import the modules themselves: this package re-exports nothing, so a manifest read does
not import torch.
"""
