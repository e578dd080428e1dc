"""The release format and the operations on release folders: split, merge, verify, inspect.

Imports only ``p2u_hub.codecs``, ``p2u_hub.errors`` and its own modules (plus torch, safetensors,
huggingface_hub); never the integrations or the tools above it.
"""
