"""Test audio made here, no downloads: speech-like tones, and writers for FLAC (LibriLight's format) and WAV.

`write_audio` writes a speech-like file by its suffix. sphn only writes mono WAV (and Opus), so FLAC and
multi-channel WAV are written by hand. The FLAC writer stores
VERBATIM subframes (no compression): a valid stream any decoder reads, with the exact 16-bit samples given.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import sphn

FLAC_BLOCK = 4096  # samples per FLAC frame (block size code 0b1100)


def speech_like(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Mono float32 [N]: harmonic tones whose pitch glides and wobbles, gated into 'syllables' with pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 110 + 50 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6)) + 8 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(h * phase) / h for h in range(1, 7))
    syllables = np.clip(np.sin(2 * np.pi * 3.7 * t + rng.uniform(0, 6)), 0, None) ** 0.5  # ~4 syllables/s
    pauses = (np.sin(2 * np.pi * 0.4 * t) > -0.7).astype(float)
    noise = 0.01 * rng.standard_normal(n)
    return (0.25 * voice * syllables * pauses + noise).astype(np.float32)


def _to_int16(pcm: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pcm * 32767), -32768, 32767).astype(np.int16)


def write_wav_multichannel(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV of pcm [C, N] float in [-1, 1] (stdlib `wave`: interleaved frames)."""
    samples = _to_int16(pcm).T.copy()  # [N, C], interleaved when flattened
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(n: int) -> bytes:
    """FLAC's frame number coding: UTF-8's scheme extended to 36 bits (we only need up to 16 bits)."""
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | (n >> 6), 0x80 | (n & 0x3F)])
    if n < 0x10000:
        return bytes([0xE0 | (n >> 12), 0x80 | ((n >> 6) & 0x3F), 0x80 | (n & 0x3F)])
    raise ValueError("test FLAC files are limited to 65536 frames")


def write_flac(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """16-bit FLAC of pcm [N] or [C, N] float in [-1, 1], fixed blocks of FLAC_BLOCK samples, VERBATIM subframes."""
    samples = _to_int16(np.atleast_2d(pcm))
    channels, total = samples.shape
    info = (
        FLAC_BLOCK.to_bytes(2, "big") + FLAC_BLOCK.to_bytes(2, "big") + bytes(6)  # block sizes; frame sizes unknown
        + ((sample_rate << 44) | ((channels - 1) << 41) | (15 << 36) | total).to_bytes(8, "big")  # rate/ch/16 bits
        + bytes(16)  # MD5 unknown (all zero is allowed)
    )
    out = bytearray(b"fLaC" + bytes([0x80]) + len(info).to_bytes(3, "big") + info)  # last (only) metadata block
    for number, start in enumerate(range(0, total, FLAC_BLOCK)):
        block = samples[:, start : start + FLAC_BLOCK]
        size = block.shape[1]
        size_code, size_tail = (0xC, b"") if size == FLAC_BLOCK else (0x7, (size - 1).to_bytes(2, "big"))
        # sync + fixed blocking; block size code | rate from STREAMINFO; channels - 1 | 16 bits per sample
        header = bytes([0xFF, 0xF8, size_code << 4, ((channels - 1) << 4) | (0b100 << 1)])
        header += _utf8_number(number) + size_tail
        frame = bytearray(header + bytes([_crc8(header)]))
        for channel in block:
            frame += bytes([0x02])  # subframe header: VERBATIM, no wasted bits
            frame += channel.astype(">i2").tobytes()
        frame += _crc16(bytes(frame)).to_bytes(2, "big")
        out += frame
    Path(path).write_bytes(bytes(out))


def write_audio(path: Path, seconds: float, rate: int, channels: int, seed: int = 0) -> None:
    """A speech-like file of `channels` channels (seeds seed, seed + 1, ...): FLAC by its suffix, else WAV."""
    pcm = np.stack([speech_like(seconds, rate, seed=seed + c) for c in range(channels)])
    if path.suffix == ".flac":
        write_flac(path, pcm, rate)
    elif channels == 1:
        sphn.write_wav(str(path), pcm[0], rate)
    else:
        write_wav_multichannel(path, pcm, rate)
