"""The short demo run the engine tests share.

Two epochs of the demo data at batch 4 (60 steps, a few seconds on 2 cores) on the random
`tiny` base: these tests check the engine (files, metadata, logs, resume, generation),
not learning, so they skip the demo's own base, tiny-trained.
"""

SHORT_RUN = ["model.builtin=tiny", "train.epochs=2", "train.batch_size=4", "sample.steps=2"]
