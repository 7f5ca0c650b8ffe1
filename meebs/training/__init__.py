"""Training: one run around the step (epochs, data order, saving, resume, validation,
samples, logs), the step's math, stops, determinism, several processes, and the bench.
"""
