"""Generative models over genkern's ops."""
from genkern.models.transformer import ModelArgs, TransformerLM

__all__ = ["ModelArgs", "TransformerLM"]
