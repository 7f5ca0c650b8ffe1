"""Other tools' formats: kohya_ss GUI configs (import and export), the single-file LDM
checkpoint and the diffusers folder a merged model is written as.
"""
