"""``scores.safetensors`` written tensor by tensor: host memory stays bounded by one tensor, whatever the model.

The safetensors format is an 8-byte little-endian header length N, a JSON header of N bytes
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, offsets relative to the end of
the header), then the tensors' bytes. The header is written last: its room is reserved first from the names and
shapes of every tensor that may come (offsets at their largest), and the real header is padded with spaces to fill
it (JSON allows trailing whitespace; safetensors readers accept it). Tensors are appended as they are scored; the
file is written under a temporary name and renamed into place by :meth:`ScoreFile.commit` (atomic, like
:mod:`esa.runio`), and removed if the block fails.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from esa.tensors import TensorInfo

ALIGN = 8


class ScoreFile:
    """``with ScoreFile(path, tensors, metadata) as f: f.add(name, score) ...; f.commit()``."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str]) -> None:
        self.path = Path(path)
        self.metadata = {k: str(v) for k, v in metadata.items()}
        self.expected = {t.name: t.shape for t in tensors}
        self.entries: dict[str, dict] = {}
        self.offset = 0
        biggest = sum(4 * t.numel for t in tensors)
        room = {t.name: {"dtype": "F32", "shape": list(t.shape), "data_offsets": [biggest, biggest]} for t in tensors}
        self.room = len(self._header(room))
        self.room += -self.room % ALIGN
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.file = os.fdopen(fd, "wb")
        self.file.write(b"\0" * (8 + self.room))

    def _header(self, entries: dict) -> bytes:
        return json.dumps({**entries, "__metadata__": self.metadata}, separators=(",", ":")).encode()

    def add(self, name: str, score: torch.Tensor) -> None:
        """Append one float32 tensor (copied to the host on its own)."""
        if name not in self.expected or name in self.entries:
            raise ValueError(f"unexpected or repeated tensor {name!r} for {self.path.name}")
        data = score.detach().to(device="cpu", dtype=torch.float32).contiguous()
        size = 4 * data.numel()
        self.file.write(memoryview(data.reshape(-1).numpy()).cast("B"))  # the tensor's own bytes, no copy
        self.entries[name] = {"dtype": "F32", "shape": list(data.shape), "data_offsets": [self.offset,
                                                                                       self.offset + size]}
        self.offset += size

    def commit(self) -> None:
        """Write the header of the tensors added, and move the file into place."""
        header = self._header(self.entries)
        header += b" " * (self.room - len(header))
        self.file.seek(0)
        self.file.write(struct.pack("<Q", len(header)))
        self.file.write(header)
        self.file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> "ScoreFile":
        return self

    def close(self) -> None:
        """Discard the file unless it was committed."""
        if not self.file.closed:
            self.file.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
