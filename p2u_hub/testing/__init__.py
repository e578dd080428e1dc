"""Test support: a local Hugging Face Hub server and a pytest fixture pointing ``huggingface_hub`` at it."""

from .hub_server import LocalHub, serve

__all__ = ["LocalHub", "serve"]
