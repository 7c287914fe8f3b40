import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cleaning.audio import read_audio, resample
from cleaning.fingerprint import (FINGERPRINT_SAMPLE_RATE_HZ, FRAME_SAMPLES, HOP_SAMPLES, NEAR_DUPLICATE_THRESHOLD,
                                  find_exact_duplicates, find_near_duplicates, fingerprint, fingerprint_similarity)
from cleaning.measure import measure_pcm_sha256

AUDIO = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "audio"
RATE = 44100


def melody(frequencies_hz: list[float], duration_s: float = 10.0, note_s: float = 0.5) -> np.ndarray:
    """float32 ``(2, samples)`` at 44.1 kHz: notes of 5 harmonics with a 10 ms attack and exponential decay,
    one every ``note_s``, cycling through ``frequencies_hz``; peak 0.3 full scale."""
    t = np.arange(int(note_s * RATE)) / RATE
    envelope = np.exp(-3 * t) * np.minimum(1.0, t / 0.01)
    notes = [envelope * sum(np.sin(2 * np.pi * f * h * t) / h for h in range(1, 6))
             for f in frequencies_hz]
    signal = np.concatenate([notes[k % len(notes)] for k in range(int(duration_s / note_s))])
    signal = 0.3 * signal / np.max(np.abs(signal))
    return np.stack([signal, 0.8 * signal]).astype(np.float32)


def codec_round_trip(audio: np.ndarray, fmt: str, subtype: str) -> tuple[np.ndarray, int]:
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, RATE, format=fmt, subtype=subtype)
    buffer.seek(0)
    return read_audio(buffer)


@pytest.fixture(scope="module")
def original():
    audio = melody([261.6, 329.6, 392.0, 523.3, 440.0, 349.2])
    return audio, fingerprint(audio, RATE)


def test_fingerprint_shape_and_dtype(original):
    audio, print_ = original
    assert print_.dtype == np.uint32
    expected = (int(np.ceil(audio.shape[1] * FINGERPRINT_SAMPLE_RATE_HZ / RATE)) - FRAME_SAMPLES) // HOP_SAMPLES
    assert print_.shape == (expected,)
    bits = (print_[None] >> np.arange(32, dtype=np.uint32)[:, None]) & 1
    assert 0.3 < bits.mean() < 0.7  # about half the bits set: not a constant or degenerate print
    assert len(np.unique(print_)) > 0.1 * len(print_)  # (a decaying note repeats its sub-fingerprint)
    assert fingerprint(audio[:, :1000], RATE).shape == (0,)  # shorter than one frame
    assert fingerprint_similarity(print_, print_) == 1.0


def test_fingerprint_of_a_shared_channel_mean_is_the_same(original):
    """Ingest passes the channel mean computed by the one-pass level kernel; the print is bit-identical."""
    from cleaning.measure import measure_levels

    audio, print_ = original
    interleaved = np.ascontiguousarray(audio.T).T
    mono = measure_levels(interleaved, RATE, with_mono=True).mono
    assert np.array_equal(fingerprint(interleaved, RATE, mono=mono), print_)
    assert np.array_equal(fingerprint(audio[:1], RATE), fingerprint(audio[:1].copy(), RATE))
    with pytest.raises(ValueError, match="mono"):
        fingerprint(audio, RATE, mono=mono[:-1])


def test_gain_resampling_and_lossy_copies_are_near_duplicates(original):
    audio, print_ = original
    copies = {
        "gain -6 dB": (audio * 10 ** (-6 / 20), RATE),
        "44.1k→32k→44.1k": (resample(resample(audio, RATE, 32000), 32000, RATE), RATE),
        "Ogg Vorbis": codec_round_trip(audio, "OGG", "VORBIS"),
    }
    if "MP3" in sf.available_formats():
        copies["MP3"] = codec_round_trip(audio, "MP3", "MPEG_LAYER_III")
    for name, (copy, rate) in copies.items():
        similarity = fingerprint_similarity(print_, fingerprint(copy, rate))
        assert similarity > NEAR_DUPLICATE_THRESHOLD, f"{name}: {similarity:.3f}"


def test_other_music_is_not_a_near_duplicate(original):
    _, print_ = original
    other_key = melody([293.7, 370.0, 440.0, 587.3, 493.9, 392.0])
    same_notes_other_order = melody([261.6, 392.0, 329.6, 523.3, 349.2, 440.0])
    for audio in (other_key, same_notes_other_order):
        assert fingerprint_similarity(print_, fingerprint(audio, RATE)) < 0.7


def test_an_excerpt_with_an_offset_matches_and_silence_does_not_count(original):
    audio, print_ = original
    excerpt = audio[:, int(2.3 * RATE):int(8.1 * RATE)]  # starts 2.3 s in: an offset of ~198 frames
    assert fingerprint_similarity(print_, fingerprint(excerpt, RATE)) > 0.95
    assert fingerprint_similarity(print_, fingerprint(excerpt, RATE), max_shift_s=1.0) < 0.7  # offset not tried
    padded = np.concatenate([np.zeros((2, 3 * RATE), np.float32), audio], axis=1)  # 3 s of leading silence
    assert fingerprint_similarity(print_, fingerprint(padded, RATE)) > 0.95
    silence = fingerprint(np.zeros((2, 5 * RATE), np.float32), RATE)
    assert not silence.any()
    assert fingerprint_similarity(silence, silence) == 0.0  # no information, no match


def test_find_near_duplicates_reports_each_pair_once_in_id_order(original):
    audio, print_ = original
    prints = {
        "c": fingerprint(audio * 0.5, RATE),
        "a": print_,
        "b": fingerprint(melody([293.7, 370.0, 440.0, 587.3, 493.9, 392.0]), RATE),
    }
    pairs = find_near_duplicates(prints)
    assert [(a, b) for a, b, _ in pairs] == [("a", "c")]
    assert pairs[0][2] > 0.95
    assert find_near_duplicates(prints, threshold=0.0) == sorted(find_near_duplicates(prints, threshold=0.0))
    assert len(find_near_duplicates(prints, threshold=0.0)) == 3
    with pytest.raises(ValueError, match="threshold"):
        find_near_duplicates(prints, threshold=1.5)


def test_exact_duplicates_by_pcm_hash_across_containers(tmp_path, original):
    audio, _ = original
    pcm16 = np.round(audio.T * 32767).astype(np.int16)  # the same PCM in both files
    sf.write(tmp_path / "a.wav", pcm16, RATE, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", pcm16, RATE, subtype="PCM_16")
    sf.write(tmp_path / "quieter.flac", pcm16 // 2, RATE, subtype="PCM_16")
    hashes = {path.name: measure_pcm_sha256(read_audio(path)[0]) for path in sorted(tmp_path.iterdir())}
    assert find_exact_duplicates(hashes) == [("a.flac", "a.wav")]


def test_real_recordings():
    """Two Kevin MacLeod recordings (first 20 s) differ; one of them at −9 dB and resampled to 32 kHz does not."""
    paths = [AUDIO / "librosa_Kevin_MacLeod_-_P_I_Tchaikovsky_Dance_of_the_Sugar_Plum_Fairy.hq.ogg",
             AUDIO / "librosa_Kevin_MacLeod_-_Vibe_Ace.hq.ogg"]
    if not all(path.exists() for path in paths):
        pytest.fail(f"the real corpus is not at {AUDIO}: this test needs ../shared/corpus beside the repo")
    (first, rate_1), (second, rate_2) = (read_audio(path) for path in paths)
    first, second = first[:, :20 * rate_1], second[:, :20 * rate_2]
    print_1, print_2 = fingerprint(first, rate_1), fingerprint(second, rate_2)
    assert fingerprint_similarity(print_1, print_2) < 0.7
    copy = resample(first * 10 ** (-9 / 20), rate_1, 32000)
    assert fingerprint_similarity(print_1, fingerprint(copy, 32000)) > 0.95


@pytest.mark.parametrize("length", [100_003, 100_000, 8, 1])
def test_compiled_decimation_equals_resample_poly(length):
    """The 44.1 kHz path (a compiled FIR evaluated at the kept samples) computes what scipy's polyphase
    resampler computes with the same anti-aliasing filter, edges included, whatever the length."""
    import scipy.signal

    from cleaning.fingerprint import _antialias_filter, _decimate

    signal = np.random.default_rng(5).standard_normal(length).astype(np.float32)
    taps = _antialias_filter(44100, 1)
    ours = _decimate(signal, taps, 8)
    reference = scipy.signal.resample_poly(signal, 1, 8, window=taps)
    assert ours.shape == reference.shape == (-(-length // 8),)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_packed_sub_fingerprints_are_the_bits_of_haitsma_and_kalker_definition():
    """The compiled packing (cleaning.kernels.pack_sub_fingerprints) against the definition written in numpy: bit m
    of frame n is the sign of (E[n+1,m] − E[n+1,m+1]) − (E[n,m] − E[n,m+1]); frames beside a silent one are 0.
    Energies are drawn so that equal neighbours (a difference of exactly 0: bit clear) occur too."""
    from cleaning.kernels import pack_sub_fingerprints

    rng = np.random.default_rng(7)
    energies = rng.integers(0, 4, size=(500, 33)).astype(np.float64) * rng.choice([1e-3, 1.0, 1e3], size=(500, 1))
    mean_square = rng.choice([1e-9, 1.0], p=[0.1, 0.9], size=500)
    floor = 1e-7
    difference = energies[:, :-1] - energies[:, 1:]
    bits = (difference[1:] - difference[:-1]) > 0
    expected = (bits.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)
    expected[(mean_square[1:] < floor) | (mean_square[:-1] < floor)] = 0
    got = pack_sub_fingerprints(energies, mean_square, floor, np.empty(499, dtype=np.uint32))
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, expected)
    assert 0 < np.count_nonzero(got == 0) < 499 and np.any(got >= 1 << 31)  # silence and the top bit both occur


def test_fingerprint_at_44_1_khz_imports_neither_torch_nor_scipy_signal():
    """Ingest fingerprints every mixture in every worker: importing torch (~3 s) or scipy.signal (~1 s) there would
    add seconds to each process, a one-track ingest's included."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from cleaning.fingerprint import fingerprint; "
            "fingerprint(np.zeros((2, 44100), np.float32), 44100); "
            "print('torch' in sys.modules, 'scipy.signal' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "False False"


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 32000, 44100, 48000, 96000, 192000])
def test_filter_design_without_scipy_signal_is_scipys_to_the_bit(rate):
    """The Hann window and the anti-alias low-pass are computed as scipy.signal computes them (so fingerprints
    are unchanged), without importing it: equal to the bit to get_window, kaiserord and firwin."""
    from fractions import Fraction

    import scipy.signal

    from cleaning import fingerprint as fp

    assert np.array_equal(fp._hann(), scipy.signal.get_window("hann", FRAME_SAMPLES).astype(np.float32))
    up = (Fraction(FINGERPRINT_SAMPLE_RATE_HZ).limit_denominator(1000) / rate).numerator
    width = (fp._ANTIALIAS_STOP_HZ - fp.BAND_HIGH_HZ) / (rate * up / 2.0)
    num_taps, beta = scipy.signal.kaiserord(60.0, width)
    assert fp._kaiserord(60.0, width) == (num_taps, beta)
    num_taps = max(num_taps, 2 * up + 1) | 1
    expected = scipy.signal.firwin(num_taps, (fp.BAND_HIGH_HZ + fp._ANTIALIAS_STOP_HZ) / 2.0,
                                   window=("kaiser", beta), fs=rate * up) * up
    assert np.array_equal(fp._antialias_filter.__wrapped__(rate, up), expected.astype(np.float32))
