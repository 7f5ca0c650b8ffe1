"""Training data: the kohya folder layout and captions, buckets, the validation split,
latents and their cache, and `prep` (survey, drop list, cleaning, record).
"""
