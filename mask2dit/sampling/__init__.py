"""Sampling Mask²DiT stories (docs/method.md §7): the pipeline, its denoising loop, the
prompt and context encoding, and the sampling parameters. Used by the batch sampler
(``sampler``) and by validation during training (``trainer.validation``)."""
