"""The base model: loading and pinning it, the built-ins, the tokenizer, text encoding,
drawing samples, placing it on a device, and downloading SD 1.5.
"""
