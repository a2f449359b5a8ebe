"""Scoring videos: the video encoders behind one small interface (``encoders``), used by
the SFT data filter today and by evaluation of sampled stories."""
