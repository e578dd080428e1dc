"""Bridges between the core and the libraries users load models with: the transformers quantizer
("p2u") with its packed layers, and the in-place upgrade of a loaded model. Each module imports its
library, so import them only when needed.
"""
