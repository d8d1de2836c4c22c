"""Where the bytes of a compressax file go: a Deep Compression Table 2.

Every figure is read from the encodings :func:`compressax.io.save` actually
chose (the manifest), never estimated, and the total is the file's size, so
``report.ratio == dense_fp32_bytes / os.path.getsize(file)``.

References:
  Han, Mao, Dally. Deep Compression. ICLR 2016, Table 2.
  https://arxiv.org/abs/1510.00149
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from compressax.io._format import _encode, save
from compressax.io._load import parse

__all__ = ["LeafSize", "SizeReport", "size_report"]


@dataclasses.dataclass(frozen=True)
class LeafSize:
  """Storage of one leaf (a dense array or a top-level compressed node).

  Attributes:
    path: ``/``-joined leaf path.
    kind: ``"dense"`` or the node's class name (without its namespace).
    params: elements of the dense array it stands for.
    kept: weights kept (the mask's count for a masked node, else ``params``).
    value_bytes_raw / value_bytes: weights, scales, codebooks... before and
      after entropy coding (bit-packed codes and raw floats before).
    index_bytes_raw / index_bytes: the sparse positions (bool masks: packed
      relative indices or bitmap) before and after entropy coding.
  """
  path: str
  kind: str
  params: int
  kept: int
  value_bytes_raw: int
  value_bytes: int
  index_bytes_raw: int
  index_bytes: int

  @property
  def dense_fp32_bytes(self) -> int:
    return 4 * self.params

  def _per_kept(self, nbytes: int) -> float:
    return 8.0 * nbytes / self.kept if self.kept else 0.0

  @property
  def weight_bits(self) -> float:
    """Value bits per kept weight before entropy coding (P+Q)."""
    return self._per_kept(self.value_bytes_raw)

  @property
  def weight_bits_coded(self) -> float:
    """Value bits per kept weight after entropy coding (P+Q+H)."""
    return self._per_kept(self.value_bytes)

  @property
  def index_bits(self) -> float:
    return self._per_kept(self.index_bytes_raw)

  @property
  def index_bits_coded(self) -> float:
    return self._per_kept(self.index_bytes)

  @property
  def bytes_raw(self) -> int:
    return self.value_bytes_raw + self.index_bytes_raw

  @property
  def bytes(self) -> int:
    return self.value_bytes + self.index_bytes


def _ratio(num: int, den: int) -> float:
  return num / den if den else float("inf")


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Per-leaf and total sizes of a compressax file (see :func:`size_report`).

  Attributes:
    leaves: one :class:`LeafSize` per leaf, in tree order.
    file_bytes: the whole file (payloads, manifest and header).
    overhead_bytes: header and manifest.
  """
  leaves: tuple[LeafSize, ...]
  file_bytes: int
  overhead_bytes: int

  @property
  def params(self) -> int:
    return sum(l.params for l in self.leaves)

  @property
  def kept(self) -> int:
    return sum(l.kept for l in self.leaves)

  @property
  def dense_fp32_bytes(self) -> int:
    return 4 * self.params

  @property
  def bytes_raw(self) -> int:
    """Payload bytes before entropy coding, plus the same overhead."""
    return sum(l.bytes_raw for l in self.leaves) + self.overhead_bytes

  @property
  def ratio_raw(self) -> float:
    return _ratio(self.dense_fp32_bytes, self.bytes_raw)

  @property
  def ratio(self) -> float:
    """Dense float32 bytes over the file's bytes."""
    return _ratio(self.dense_fp32_bytes, self.file_bytes)

  def __str__(self) -> str:
    head = ("layer", "#weights", "kept", "weight bits", "weight bits (H)",
            "index bits", "index bits (H)", "bytes", "bytes (H)", "ratio",
            "ratio (H)")
    rows: list[tuple[str, ...]] = [head]
    for l in self.leaves:
      rows.append((l.path or "<root>", f"{l.params:,}",
                   f"{100 * l.kept / l.params:.1f}%" if l.params else "-",
                   f"{l.weight_bits:.2f}", f"{l.weight_bits_coded:.2f}",
                   f"{l.index_bits:.2f}", f"{l.index_bits_coded:.2f}",
                   f"{l.bytes_raw:,}", f"{l.bytes:,}",
                   f"{_ratio(l.dense_fp32_bytes, l.bytes_raw):.1f}x",
                   f"{_ratio(l.dense_fp32_bytes, l.bytes):.1f}x"))
    tot = LeafSize("", "", self.params, self.kept,
                   sum(l.value_bytes_raw for l in self.leaves),
                   sum(l.value_bytes for l in self.leaves),
                   sum(l.index_bytes_raw for l in self.leaves),
                   sum(l.index_bytes for l in self.leaves))
    rows.append((f"total (+{self.overhead_bytes:,} B header/manifest)",
                 f"{self.params:,}",
                 f"{100 * self.kept / self.params:.1f}%" if self.params else "-",
                 f"{tot.weight_bits:.2f}", f"{tot.weight_bits_coded:.2f}",
                 f"{tot.index_bits:.2f}", f"{tot.index_bits_coded:.2f}",
                 f"{self.bytes_raw:,}", f"{self.file_bytes:,}",
                 f"{self.ratio_raw:.1f}x", f"{self.ratio:.1f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append(f"dense float32: {self.dense_fp32_bytes:,} B -> file: "
                 f"{self.file_bytes:,} B ({self.ratio:.2f}x); (H) = after "
                 "Huffman/ANS coding, bits are per kept weight")
    return "\n".join(lines)


def _arrays(rec):
  """All array records under ``rec``; and the first masked node's ``kept``."""
  t = rec["t"]
  if t == "array":
    return [rec], None
  if t == "node":
    out, kept = [], rec.get("kept")
    for _, r in rec["fields"]:
      a, k = _arrays(r)
      out += a
      kept = kept if kept is not None else k
    return out, kept
  if t in ("dict", "list", "tuple"):
    items = [r for _, r in rec["items"]] if t == "dict" else rec["items"]
    out = []
    for r in items:
      out += _arrays(r)[0]
    return out, None
  return [], None


def _leaves(rec, path):
  t = rec["t"]
  if t == "dict":
    for k, r in rec["items"]:
      yield from _leaves(r, path + (k,))
  elif t in ("list", "tuple"):
    for i, r in enumerate(rec["items"]):
      yield from _leaves(r, path + (str(i),))
  elif t in ("array", "node"):
    arrays, kept = _arrays(rec)
    shape = rec["shape"] if t == "array" else rec["meta"]["shape"]
    params = int(np.prod(shape, dtype=np.int64))
    sums = {True: [0, 0], False: [0, 0]}
    for a in arrays:
      s = sums[a["dtype"] == "bool"]
      s[0] += int(a["enc"]["raw"])
      s[1] += int(a["p"][1])
    kind = "dense" if t == "array" else rec["class"].rsplit(".", 1)[-1]
    yield LeafSize("/".join(path), kind,
                   params, params if kept is None else int(kept),
                   sums[False][0], sums[False][1], sums[True][0], sums[True][1])


def size_report(tree_or_path, *, file=None) -> SizeReport:
  """Per-leaf and total storage of a saved (or to-be-saved) pytree.

  Args:
    tree_or_path: a file written by :func:`compressax.io.save`, or a pytree.
    file: with a pytree, save it to this path first and report on that file;
      without, the pytree is encoded in memory exactly as ``save`` would.

  Returns:
    A :class:`SizeReport`; ``print(report)`` shows a table in the style of
    Deep Compression's Table 2 (weights kept, bits per weight for values and
    indices before and after entropy coding, compression ratio vs dense
    float32). ``report.ratio`` is dense float32 bytes over the file's bytes.

  Raises:
    CorruptFileError: if the file does not parse.

  Example:
    >>> print(cx.io.size_report("model.cx"))  # doctest: +SKIP

  References:
    Han, Mao, Dally. Deep Compression. ICLR 2016, Table 2.
    https://arxiv.org/abs/1510.00149
  """
  if isinstance(tree_or_path, (str, os.PathLike)):
    if file is not None:
      raise TypeError("`file` is only for a pytree; got a path already")
    name = os.fspath(tree_or_path)
    with open(name, "rb") as f:
      data = f.read()
  elif file is not None:
    save(file, tree_or_path)
    name = os.fspath(file)
    with open(name, "rb") as f:
      data = f.read()
  else:
    name = "<memory>"
    data = b"".join(_encode(tree_or_path))
  manifest, payloads = parse(data, name)
  leaves = tuple(_leaves(manifest["tree"], ()))
  return SizeReport(leaves, len(data), len(data) - len(payloads))
