"""The offline data jobs, each ``python -m datajobs.JOB --spec SPEC`` started by ``m2d
data ...``: ``synth`` (a synthetic dataset; ``toy_synth`` the toy world's), ``inspect_manifest``
(what a manifest holds), ``filter`` (the SFT inter-scene similarity filter), ``precompute``
(a stage's latents and text embeddings, on a Ray Data actor pool of ``shard_encoder``).

The training worker runs none of them: it keeps what it reads with (``trainer.data``: the
manifest and latent formats, the story order, the decoding loader). The direction is one
way: these jobs use ``trainer`` (its manifest reader, its frozen encoders), never the
reverse.

Import the modules themselves: this package re-exports nothing, so a job's start imports
only what that job needs.
"""
