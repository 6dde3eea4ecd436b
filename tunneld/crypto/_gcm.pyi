from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

class GCM:
    def __init__(self, key: bytes) -> None: ...
    def seal(self, nonces: Buffer, aads: Buffer, aad_len: int, plaintexts: Sequence[Buffer],
             out: Buffer, start: int, stride: int) -> None: ...
    def open(self, nonces: Buffer, aads: Buffer, aad_len: int, data: Buffer, start: int, stride: int,
             length: int, last_length: int, out: Buffer, out_stride: int) -> int: ...
