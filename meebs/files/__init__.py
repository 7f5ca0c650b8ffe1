"""Bytes on disk, written safely: atomic writes, text files read strictly, safetensors
with canonical headers, PNGs, and the cache of verified file hashes. Imports only `errors`.
"""
