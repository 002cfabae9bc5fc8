"""Widen a trained Llama with the blocks of a wider donor, streaming, with the RMSNorm compensation done right."""
