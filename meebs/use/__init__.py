"""Using a trained network: generate with A1111 prompt tags, the grid, merge into a base
model, inspect, and the TensorBoard sidecar.
"""
