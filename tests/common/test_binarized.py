import os
import struct

import numpy as np
import pytest

from common.binarized import (IndexedTokens, MAGIC, best_dtype, read_split, split_marker, write_indexed)


def _items(rng, n=7, vocab=50257):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def _original_writer(prefix, items, dtype):
    """The MMIDIDX builder as contra_kd.md §2.3 describes it (fairseq/Megatron MMapIndexedDatasetBuilder:
    add_item per item, finalize with doc_idx = [0]), written here independently of common/binarized.py."""
    codes = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float32: 6, np.float64: 7,
             np.uint16: 8, np.uint32: 9}
    sizes = []
    with open(prefix + ".bin", "wb") as f:
        for item in items:
            # the originals pass an IntTensor whose -1 wraps to the marker when cast to an unsigned dtype
            f.write(np.array(np.asarray(item, dtype=np.int32), dtype=dtype).tobytes(order="C"))
            sizes.append(len(item))
    pointers, address = [], 0
    for size in sizes:
        pointers.append(address)
        address += size * np.dtype(dtype).itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", codes[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", 1))
        f.write(np.array(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.array(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.array([0], dtype=np.int64).tobytes(order="C"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32])
def test_round_trip_returns_every_item_unchanged(tmp_path, dtype):
    items = _items(np.random.default_rng(0), vocab=60000)
    write_indexed(str(tmp_path / "train_0"), items, dtype)
    data = IndexedTokens(str(tmp_path / "train_0"))
    assert data.dtype == np.dtype(dtype) and len(data) == len(items)
    for i, item in enumerate(items):
        assert data[i].tolist() == item


def test_index_bytes_follow_the_spec_layout_field_by_field(tmp_path):
    items = [[5, 6, 7], [], [1, 65535, 9, 10], [42]]
    write_indexed(str(tmp_path / "x"), items, np.uint16)
    raw = (tmp_path / "x.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)                 # version
    assert raw[17] == 8                                           # dtype code: uint16
    assert struct.unpack("<Q", raw[18:26]) == (4,)                # N
    assert struct.unpack("<Q", raw[26:34]) == (1,)                # D
    assert struct.unpack("<4i", raw[34:50]) == (3, 0, 4, 1)        # sizes int32[N]
    assert struct.unpack("<4q", raw[50:82]) == (0, 6, 6, 14)       # pointers int64[N], bytes = Σ sizes·2
    assert struct.unpack("<q", raw[82:90]) == (0,)                 # doc_idx = [0]
    assert len(raw) == 90
    assert (tmp_path / "x.bin").read_bytes() == np.array([5, 6, 7, 1, 65535, 9, 10, 42], "<u2").tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_files_of_the_original_writer_read_back_identically_and_ours_are_byte_equal(tmp_path, dtype):
    rng = np.random.default_rng(1)
    marker = -1 if dtype == np.uint16 else split_marker(dtype)
    items = [p + [marker] + r for p, r in zip(_items(rng, vocab=50000), _items(rng, vocab=50000))]
    _original_writer(str(tmp_path / "orig"), items, dtype)
    write_indexed(str(tmp_path / "ours"), items, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"orig{ext}").read_bytes() == (tmp_path / f"ours{ext}").read_bytes()
    data = IndexedTokens(str(tmp_path / "orig"))
    assert data.marker == split_marker(dtype)
    for i, item in enumerate(items):
        want = [data.marker if t == -1 else t for t in item]
        assert data[i].tolist() == want


def test_split_reader_concatenates_shards_until_one_is_missing(tmp_path):
    rng = np.random.default_rng(2)
    a, b = _items(rng, 3), _items(rng, 4)
    write_indexed(str(tmp_path / "train_0"), a, np.uint16)
    write_indexed(str(tmp_path / "train_1"), b, np.uint16)
    write_indexed(str(tmp_path / "train_3"), [[1]], np.uint16)  # not reached: train_2 is missing
    data = read_split(str(tmp_path), "train")
    assert [data[i].tolist() for i in range(len(data))] == a + b


def test_marker_comes_from_the_file_dtype_and_vocab_picks_it():
    assert best_dtype(50257) == np.uint16 and best_dtype(151936) == np.int32
    assert split_marker(np.uint16) == 65535 and split_marker(np.int32) == 2**31 - 1


def test_dtype_marker_that_does_not_match_the_data_is_one_clear_error(tmp_path):
    write_indexed(str(tmp_path / "train_0"), [[1, 2, 3], [4, 5]], np.uint16)
    raw = bytearray((tmp_path / "train_0.idx").read_bytes())
    raw[17] = 4  # claims int32: pointers and .bin size no longer fit
    (tmp_path / "train_0.idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_0\.idx: pointer of item 1 is 6.*int32.*does not match") as e:
        IndexedTokens(str(tmp_path / "train_0"))
    assert "\n" not in str(e.value)


def test_index_whose_sizes_do_not_match_the_bin_is_one_clear_error(tmp_path):
    write_indexed(str(tmp_path / "train_0"), [[1, 2, 3], [4, 5]], np.uint16)
    with open(tmp_path / "train_0.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match=r"train_0\.bin: 12 bytes, but its index .* needs 10"):
        IndexedTokens(str(tmp_path / "train_0"))


def test_truncated_index_and_wrong_magic_are_clear_errors(tmp_path):
    write_indexed(str(tmp_path / "a"), [[1, 2, 3]], np.uint16)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match=r"a\.idx: .* bytes, but N=1 .* truncated"):
        IndexedTokens(str(tmp_path / "a"))
    (tmp_path / "a.idx").write_bytes(b"TNTIDX\x00\x00" + raw[8:])
    with pytest.raises(ValueError, match="not an MMIDIDX index"):
        IndexedTokens(str(tmp_path / "a"))


def test_token_outside_the_dtype_is_refused_and_nothing_is_left_behind(tmp_path):
    with pytest.raises(ValueError, match=r"item 1 holds token 70000 outside uint16"):
        write_indexed(str(tmp_path / "t"), [[1], [70000]], np.uint16)
    assert os.listdir(tmp_path) == []
    assert MAGIC == b"MMIDIDX\x00\x00"
