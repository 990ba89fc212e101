import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "jax"])
@pytest.mark.parametrize("word_bits", [8, 32])
@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_width(bits, word_bits, host):
    rng = np.random.default_rng(bits)
    for lead, length in [((3,), n) for n in (1, 7, 8, 33, 100)] + [((2, 3), 77)]:
        codes = rng.integers(0, 2 ** bits, size=(*lead, length), dtype=np.uint8)
        words = pack_bits(codes if host else jnp.asarray(codes), bits, word_bits)
        assert isinstance(words, np.ndarray) == host
        if not host:      # the NumPy and JAX packings are written differently: each is the other's oracle
            np.testing.assert_array_equal(np.asarray(words), pack_bits(codes, bits, word_bits))
            np.testing.assert_array_equal(unpack_bits(np.asarray(words), bits, length, word_bits),
                                          np.asarray(unpack_bits(words, bits, length, word_bits)))
        assert words.dtype == (np.uint8 if word_bits == 8 else np.uint32)
        assert words.shape == (*lead, bits * -(-length // word_bits))
        assert words.shape[-1] * word_bits // 8 == packed_nbytes(length, bits, word_bits)
        np.testing.assert_array_equal(np.asarray(unpack_bits(words, bits, length, word_bits)), codes)


def test_packing_is_dense_for_full_words():
    # 8 values of 3 bits fill exactly 3 bytes: no padding when the row is a multiple of 8.
    codes = np.arange(8, dtype=np.uint8)
    words = np.asarray(pack_bits(codes, 3))
    assert words.shape == (3,)
    stream = "".join(format(int(w), "08b")[::-1] for w in words)     # LSB-first bit stream
    assert [int(stream[3 * j:3 * j + 3][::-1], 2) for j in range(8)] == list(range(8))


@pytest.mark.parametrize("bad", [0, 9])
def test_bad_width_raises(bad):
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(np.zeros(8, np.uint8), bad)


def test_wrong_packed_length_raises():
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(np.zeros(5, np.uint8), 2, 8)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 7)])
@pytest.mark.parametrize("word_bits", [8, 32])
def test_zero_size_arrays_pack_alike_in_numpy_and_jax(shape, word_bits):
    codes = np.zeros(shape, np.uint8)
    host, dev = pack_bits(codes, 3, word_bits), np.asarray(pack_bits(jnp.asarray(codes), 3, word_bits))
    assert host.shape == dev.shape == (*shape[:-1], 3 * -(-shape[-1] // word_bits)) and host.dtype == dev.dtype
    for words in (host, jnp.asarray(host)):
        back = np.asarray(unpack_bits(words, 3, shape[-1], word_bits))
        assert back.shape == shape and back.dtype == np.uint8


def test_high_bits_of_oversized_values_are_dropped_alike():
    # pack_bits keeps the low `bits` bits of each value, in NumPy (through uint8) and in JAX (through uint32)
    codes = np.array([[0, 5, 255, 256, 300, 1023, -1, 7]])
    for bits in (1, 3, 8):
        host = pack_bits(codes, bits)
        np.testing.assert_array_equal(host, np.asarray(pack_bits(jnp.asarray(codes, jnp.int32), bits)))
        np.testing.assert_array_equal(unpack_bits(host, bits, 8), codes & (2 ** bits - 1))
