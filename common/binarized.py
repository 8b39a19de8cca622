"""Binarised, indexed, memory-mapped token data: the fairseq / Megatron "MMIDIDX" layout that MiniLLM, DistiLLM
and CONTRA-KD read (contra_kd.md §2.3). Files we write load in their loaders and theirs load here.

    write_indexed("out/train_0", items, np.uint16)       # out/train_0.bin + out/train_0.idx
    data = read_split("out", "train")                    # shards train_0, train_1, ... until one is missing
    data[i]                                              # np.ndarray of item i's tokens (a view into the memmap)

`.bin`: all items' tokens concatenated, C order, no header. `.idx`, little-endian:
    magic b"MMIDIDX\\x00\\x00" (9 bytes) | version uint64 = 1 | dtype code uint8 | N uint64 | D uint64 |
    sizes int32[N] | pointers int64[N] (byte offset of each item) | doc_idx int64[D] (= [0] here).
Items may hold a split marker (prompt ⟂ response) = iinfo(dtype).max; readers take it from the file's dtype.
"""
import os
import struct

import numpy as np

from common.cli import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
          8: np.uint16, 9: np.uint32}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, d in DTYPES.items():
        if np.dtype(d) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of {[np.dtype(d).name for d in DTYPES.values()]}")


def best_dtype(vocab_size: int):
    """uint16 below 65,500 tokens (GPT-2, OPT, LLaMA/LLaMA-2, OpenLLaMA), else int32 (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def split_marker(dtype) -> int:
    """The prompt/response separator of `full` items: the dtype's largest value (65535 for uint16)."""
    return int(np.iinfo(dtype).max)


def _write_tokens(path, items, dtype, sizes):
    info = np.iinfo(dtype) if dtype.kind in "ui" else None
    with open(path, "wb") as f:
        for i, item in enumerate(items):
            arr = np.asarray(item, dtype=np.int64)
            if info is not None and arr.size:
                if info.min == 0:
                    arr = np.where(arr == -1, info.max, arr)
                bad = arr[(arr < info.min) | (arr > info.max)]
                if bad.size:
                    raise ValueError(f"{path[:-4]}: item {i} holds token {int(bad[0])} outside {dtype.name} "
                                     f"[{info.min}, {info.max}]; write with a wider dtype (best_dtype)")
            f.write(arr.astype(dtype).tobytes(order="C"))
            sizes.append(arr.size)
        f.flush()
        os.fsync(f.fileno())


def write_indexed(prefix: str, items, dtype) -> None:
    """Write `prefix.bin` and `prefix.idx` from an iterable of integer sequences.

    Each file goes to a temporary name first and is renamed into place, the `.idx` last, so a reader never
    sees a half-written pair. A value outside the dtype's range is an error, except -1 for an unsigned dtype,
    which stands for the split marker (as the original writers pass it).
    """
    dtype = np.dtype(dtype)
    code = dtype_code(dtype)
    sizes = []
    try:
        _write_tokens(prefix + ".bin.tmp", items, dtype, sizes)
    except BaseException:
        os.remove(prefix + ".bin.tmp")
        raise
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.zeros(1, dtype=np.int64)
    with open(prefix + ".idx.tmp", "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, code, len(sizes), len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


class IndexedTokens:
    """One `prefix.bin` / `prefix.idx` pair, memory-mapped. Checks the index against itself and the data file."""

    def __init__(self, prefix: str):
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MAGIC:
            raise UserError(f"{idx_path}: not an MMIDIDX index (magic {head[:9]!r}, want {MAGIC!r}); "
                            f"re-run the data preparation")
        _, version, code, n, d = _HEADER.unpack(head)
        if version != VERSION:
            raise UserError(f"{idx_path}: index version {version}, only {VERSION} is supported")
        if code not in DTYPES:
            raise UserError(f"{idx_path}: dtype code {code} is not one of {sorted(DTYPES)}; the file is corrupt")
        self.dtype = np.dtype(DTYPES[code])
        want = _HEADER.size + n * 4 + n * 8 + d * 8
        have = os.path.getsize(idx_path)
        if have != want:
            raise UserError(f"{idx_path}: {have} bytes, but N={n} items and D={d} doc entries need {want}; "
                            f"the index is truncated or corrupt")
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(index, dtype=np.int32, count=n, offset=_HEADER.size)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=_HEADER.size + 4 * n)
        self.doc_idx = np.frombuffer(index, dtype=np.int64, count=d, offset=_HEADER.size + 12 * n)
        expected = np.zeros(n, dtype=np.int64)
        np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        if (self.sizes < 0).any() or not np.array_equal(expected, self.pointers):
            bad = int(np.argmax(expected != self.pointers)) if n else 0
            raise UserError(f"{idx_path}: pointer of item {bad} is {int(self.pointers[bad])}, but the sizes "
                            f"and dtype {self.dtype.name} put it at {int(expected[bad])}; the index does not "
                            f"match its data")
        data_bytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != data_bytes:
            raise UserError(f"{bin_path}: {bin_bytes} bytes, but its index ({idx_path}: {n} items, dtype "
                            f"{self.dtype.name}, {int(self.sizes.sum())} tokens) needs {data_bytes}; the dtype "
                            f"marker or the index does not match the data, re-run the data preparation")
        self._data = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_bytes else np.zeros(0, np.uint8)
        self.marker = split_marker(self.dtype) if self.dtype.kind in "ui" else None

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._data, dtype=self.dtype, count=int(self.sizes[i]), offset=int(self.pointers[i]))


class IndexedSplit:
    """Shards `{split}_0`, `{split}_1`, ... of a folder, probed until one is missing, read as one sequence.
    A folder without them is a UserError naming `flag` (the caller's flag for the folder) and `fix`."""

    def __init__(self, folder: str, split: str, flag: str = "the data folder", fix: str = "run the data preparation"):
        self.shards = []
        while os.path.exists(os.path.join(folder, f"{split}_{len(self.shards)}.idx")):
            self.shards.append(IndexedTokens(os.path.join(folder, f"{split}_{len(self.shards)}")))
        if not self.shards:
            what = "does not exist" if not os.path.exists(folder) else f"holds no {split}_0.idx / {split}_0.bin"
            raise UserError(f"{flag} {folder} {what}; {fix}")
        dtypes = {s.dtype for s in self.shards}
        if len(dtypes) > 1:
            raise UserError(f"{folder}: shards of {split} mix dtypes {sorted(d.name for d in dtypes)}")
        self.dtype = self.shards[0].dtype
        self.marker = self.shards[0].marker
        self._ends = np.cumsum([len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        return self.shards[k][i - (int(self._ends[k - 1]) if k else 0)]


def read_split(folder: str, split: str, flag: str = "the data folder",
               fix: str = "run the data preparation") -> IndexedSplit:
    return IndexedSplit(folder, split, flag, fix)
