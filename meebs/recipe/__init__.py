"""The recipe: its schema (every key, its type and default), loading YAML with `extends:`
and command-line overrides, and the differences between two recipes.
"""
