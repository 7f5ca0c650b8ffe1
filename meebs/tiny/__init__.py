"""The built-in tiny world: the synthetic cartoons and data sets, pretraining the
tiny-trained base, the meeb scorer, and the verdict.
"""
