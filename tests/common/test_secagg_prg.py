from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedpipe.common.secagg.prg import MaskStreams, add_masks, expand_mask
from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.common.vector import Vector

SEEDS = [bytes([i]) * 32 for i in range(4)]


def test_a_mask_is_the_aes_256_ctr_keystream_from_a_zero_counter() -> None:
    # Counter mode's keystream is AES of the counter blocks 0, 1, 2...: built here in ECB.
    blocks = b"".join(i.to_bytes(16, "big") for i in range(5))
    encryptor = Cipher(algorithms.AES(SEEDS[1]), modes.ECB()).encryptor()
    expected = np.frombuffer(encryptor.update(blocks), dtype=np.uint32)
    assert np.array_equal(expand_mask(SEEDS[1], 20, np.dtype(np.uint32)), expected)


def test_masks_are_deterministic_per_seed_and_differ_between_seeds() -> None:
    masks = [expand_mask(s, 10_000, np.dtype(np.uint64)) for s in SEEDS]
    assert np.array_equal(masks[0], expand_mask(SEEDS[0], 10_000, np.dtype(np.uint64)))
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert np.count_nonzero(masks[i] == masks[j]) == 0
    assert masks[0].dtype == np.uint64


def test_add_masks_adds_and_subtracts_each_mask_over_the_arrays_in_name_order() -> None:
    rng = np.random.default_rng(0)
    coefs = {
        "b": rng.integers(0, 2**32, (3, 5), dtype=np.uint32),
        "a": np.arange(7, dtype=np.uint32),
    }
    target = Vector({k: v.copy() for k, v in coefs.items()})
    add_masks(target, SEEDS[:2], SEEDS[2:])
    words = [expand_mask(s, 22, np.dtype(np.uint32)).astype(np.int64) for s in SEEDS]
    mask = (words[0] + words[1] - words[2] - words[3]) % 2**32
    assert np.array_equal(target.coefs["a"], (coefs["a"] + mask[:7]) % 2**32)
    assert np.array_equal(target.coefs["b"], (coefs["b"] + mask[7:].reshape(3, 5)) % 2**32)
    add_masks(target, SEEDS[2:], SEEDS[:2])  # the opposite masks cancel them
    assert all(np.array_equal(target.coefs[k], coefs[k]) for k in coefs)


def test_a_seed_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="seed: 16 bytes, expected 32"):
        expand_mask(bytes(16), 4, np.dtype(np.uint32))


def test_a_mask_longer_than_one_chunk_continues_the_counter() -> None:
    words = 300_000  # 1.2 MB: the keystream is written in 1 MiB chunks
    blocks = b"".join(i.to_bytes(16, "big") for i in range(words * 4 // 16))
    encryptor = Cipher(algorithms.AES(SEEDS[2]), modes.ECB()).encryptor()
    expected = np.frombuffer(encryptor.update(blocks), dtype=np.uint32)
    assert np.array_equal(expand_mask(SEEDS[2], words, np.dtype(np.uint32)), expected)
    assert expand_mask(SEEDS[2], 0, np.dtype(np.uint32)).size == 0


def test_masks_folded_while_encoding_equal_masks_added_after_it() -> None:
    """The client's path (each chunk masked as it is encoded, arrays in name order, over
    several chunks and a lone weight word) gives the words of encoding, then add_masks."""
    rng = np.random.default_rng(1)
    vector = Vector({"z": rng.normal(0, 1, (150, 301)), "a": rng.normal(0, 1, 7)})
    for encoding in (FixedPoint(32, 1.0, 10, max_weight=9), FixedPoint(40, 1.0, 10)):
        weight = encoding.max_weight
        separate = encoding.encode(vector, weight)
        add_masks(separate, SEEDS[:3], SEEDS[3:])
        masks = MaskStreams(SEEDS[:3], SEEDS[3:], encoding.dtype)
        fused = encoding.encode(vector, weight, masks)
        assert list(fused.coefs) == list(separate.coefs)
        for name, words in separate.coefs.items():
            assert np.array_equal(fused.coefs[name], words), name
