"""Real compressed artifacts: bit packing, sparse index coding, entropy coding, files."""
__all__ = []
