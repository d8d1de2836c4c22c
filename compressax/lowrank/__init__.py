"""Low-rank factorization: truncated SVD, rank selection, BSR beam search."""
__all__ = []
