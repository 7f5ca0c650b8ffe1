"""Run folders and what they record: new folders, `manifest.json`, and the comparison of
two runs' inputs.
"""
