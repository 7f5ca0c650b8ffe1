"""The LyCORIS network: building it on a base model, the kohya key names, the LoHA layer
paths, saving and loading files, applying a file to a model, and its optimizer.
"""
