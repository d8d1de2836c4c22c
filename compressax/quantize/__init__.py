"""Quantization: uniform (Polino buckets, per-channel), STE, LSQ, k-means, codebooks."""
__all__ = []
