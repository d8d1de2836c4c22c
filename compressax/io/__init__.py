"""Real compressed artifacts: bit packing, sparse index coding, entropy coding, files.

``cx.io.save(path, tree)`` writes a pytree of dense arrays and compressed nodes
to a checksummed, pickle-free file; ``cx.io.load`` reads it back bit-exactly;
``cx.io.size_report`` prints a Deep Compression style table of where the bytes
go. The building blocks (bit packing, relative indices, Huffman/ANS) are
public too.
"""

from compressax.io._bitpack import pack_bits
from compressax.io._bitpack import packed_nbytes
from compressax.io._bitpack import unpack_bits
from compressax.io._entropy import ans_decode
from compressax.io._entropy import ans_encode
from compressax.io._entropy import canonical_codes
from compressax.io._entropy import decode_symbols
from compressax.io._entropy import encode_symbols
from compressax.io._entropy import entropy_bits
from compressax.io._entropy import huffman_code_lengths
from compressax.io._entropy import huffman_decode
from compressax.io._entropy import huffman_encode
from compressax.io._format import FORMAT_VERSION
from compressax.io._format import MAGIC
from compressax.io._format import CorruptFileError
from compressax.io._format import LimitExceededError
from compressax.io._load import load
from compressax.io._format import save
from compressax._node import leaf_name
from compressax._node import leaf_type
from compressax.io._orbax import restore_checkpoint
from compressax.io._orbax import save_checkpoint
from compressax.io._report import LeafSize
from compressax.io._report import SizeReport
from compressax.io._report import size_report
from compressax.io._sparse import best_index_bits
from compressax.io._sparse import bitmap_decode
from compressax.io._sparse import bitmap_encode
from compressax.io._sparse import relative_index_decode
from compressax.io._sparse import relative_index_encode

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CorruptFileError",
    "LeafSize",
    "LimitExceededError",
    "SizeReport",
    "ans_decode",
    "ans_encode",
    "best_index_bits",
    "bitmap_decode",
    "bitmap_encode",
    "canonical_codes",
    "decode_symbols",
    "encode_symbols",
    "entropy_bits",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "leaf_name",
    "leaf_type",
    "load",
    "pack_bits",
    "packed_nbytes",
    "relative_index_decode",
    "relative_index_encode",
    "restore_checkpoint",
    "save",
    "save_checkpoint",
    "size_report",
    "unpack_bits",
]
