"""Audio → Mimi codes: decoding with sphn, band-limited resampling, streaming encoding and the codes cache.

`encode_audio_file` turns one audio file into codes [num_codebooks, T] with a loaded Mimi (see `mimi`). A file is
decoded in pieces, mixed to mono, resampled to Mimi's rate and encoded in fixed-size streaming chunks, so memory
does not grow with its length (LibriLight long-form: 30-60 min each); the whole-file codes are cached on disk under
a key of file content, Mimi hash and codebook count. Problems with a file raise `DataError` naming it, among them a
decoded length that differs from the duration the file's header declares by more than one frame (truncated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from moshi.models.compression import MimiModel

from ..core.inputs import crop_frames
from ..core.runtime import inference_mode
from ..errors import DataError, one_line
from ..patches.streaming import enlarge_rings_in
from .mimi import file_sha256

log = logging.getLogger(__name__)

ENCODE_CHUNK_FRAMES = 50  # Mimi frames fed per streaming call (4 s at 12.5 Hz)
DECODE_PIECE_SECONDS = 30  # whole seconds: piece starts then fall on exact sample indices at any sample rate
# Bump when the audio -> codes pipeline (decoding, resampling, chunking) changes: stale cache entries then miss.
# 2: a truncated file (decoded length != the header's duration) is refused; entries made from one must not be reused.
CACHE_VERSION = "2"


def encode_audio_file(
    mimi: MimiModel,
    path: str | Path,
    *,
    num_codebooks: int,
    mimi_hash: str,
    cache_dir: str | Path | None,
    max_frames: int | None = None,
) -> torch.Tensor:
    """Codes [num_codebooks, T] int64 of one audio file: T = ceil(seconds · frame_rate).

    The file is decoded in pieces, mixed to mono, resampled to Mimi's rate and encoded in streaming chunks, so
    memory does not grow with its length. With `cache_dir`, codes of the whole file are stored under a key of
    (file content, Mimi hash, num_codebooks) and reused; `max_frames` crops after the cache. Without a cache,
    encoding stops once `max_frames` frames exist (Mimi is causal: the frames kept are the same).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file {path} not found")
    if mimi.channels != 1:
        raise DataError(f"Mimi with {mimi.channels} channels is not supported: audio is mixed down to mono")
    if not 1 <= num_codebooks <= mimi.total_codebooks:
        raise DataError(f"Mimi has {mimi.total_codebooks} codebooks; asked for num_codebooks={num_codebooks}")
    key = None
    if cache_dir is not None:
        key = _cache_key(path, mimi_hash, num_codebooks)
        cached = _read_cache(Path(cache_dir), key, num_codebooks)
        if cached is not None:
            log.debug("cache hit for %s: %s", path, key)
            return crop_frames(cached, max_frames)
    previous = mimi.num_codebooks
    mimi.set_num_codebooks(num_codebooks)
    try:
        codes = _encode_streaming(mimi, path, None if key else max_frames)
    finally:
        mimi.set_num_codebooks(previous)
    if key is not None:
        _write_cache(Path(cache_dir), key, codes, {"source": str(path), "mimi_hash": mimi_hash,
                                                   "num_codebooks": num_codebooks})
    return crop_frames(codes, max_frames)


class _InexactSeek(Exception):
    """Decoding in pieces did not return whole pieces: the format's seeking cannot be trusted for this file."""


def _encode_streaming(mimi: MimiModel, path: Path, stop_frames: int | None) -> torch.Tensor:
    try:
        return _encode(mimi, path, stop_frames, whole=False)
    except _InexactSeek as exc:
        log.warning("%s: %s; decoding the whole file at once instead", path, exc)
        return _encode(mimi, path, stop_frames, whole=True)


def _encode(mimi: MimiModel, path: Path, stop_frames: int | None, whole: bool) -> torch.Tensor:
    frame = mimi.frame_size
    chunk = ENCODE_CHUNK_FRAMES * frame
    device = next(mimi.parameters()).device
    out: list[torch.Tensor] = []
    frames = 0

    def encode(samples: torch.Tensor, keep: int) -> None:
        nonlocal frames
        # Always one chunk shape: moshi CUDA-graphs Mimi's encoder and replays need identical shapes. The zero
        # padding of the last chunk cannot change earlier frames: Mimi is causal.
        padded = torch.nn.functional.pad(samples, (0, chunk - samples.numel()))
        codes = mimi.encode(padded.view(1, 1, -1).to(device))[0, :, :keep]
        out.append(codes.to("cpu", torch.int64))
        frames += keep

    def enough() -> bool:
        return stop_frames is not None and frames >= stop_frames

    pending = torch.empty(0)
    with inference_mode(mimi), mimi.streaming(1):
        _enlarge_encoder_caches(mimi, chunk)
        resampler: _Resampler | None = None
        for pcm, rate in _decode_mono(path, whole, tolerance_s=1 / mimi.frame_rate):
            resampler = resampler or _Resampler(rate, mimi.sample_rate)
            pending = torch.cat([pending, resampler.push(pcm)])
            while pending.numel() >= chunk and not enough():
                encode(pending[:chunk], ENCODE_CHUNK_FRAMES)
                pending = pending[chunk:]
            if enough():
                break
        if resampler is None:
            raise DataError(f"audio file {path} holds no samples")
        if not enough():
            pending = torch.cat([pending, resampler.flush()])
            while pending.numel() > 0:
                encode(pending[:chunk], math.ceil(min(chunk, pending.numel()) / frame))
                pending = pending[chunk:]
    if not out:
        raise DataError(f"audio file {path} holds no samples")
    codes = torch.cat(out, dim=1)
    log.info("encoded %s: %d frames", path, codes.shape[1])
    return codes


def _enlarge_encoder_caches(mimi: MimiModel, chunk_samples: int) -> None:
    """Give the encoder transformer's ring KV caches room for a whole chunk (call inside streaming()).

    Why: moshi sizes each ring to the attention context, but a chunk of C encoder steps writes C keys before its
    queries attend, so its first queries would lose keys C - 1 steps old. With context + C - 1 slots streaming
    equals encoding the whole file in one call (the mask still limits each query to the context).
    """
    steps = round(chunk_samples * mimi.encoder_frame_rate / mimi.sample_rate)
    enlarge_rings_in(mimi.encoder_transformer, steps - 1)


def _decode_mono(path: Path, whole: bool, tolerance_s: float) -> Iterator[tuple[torch.Tensor, int]]:
    """(mono float32 samples, sample rate) pieces of an audio file, decoded with sphn.

    Decoding to the end checks the length against the duration the file's header declares: sphn returns what it
    can decode of a truncated or corrupt file without an error (a 12 s FLAC cut to 0.3 s decodes 0.3 s), so a
    difference of more than `tolerance_s` (one Mimi frame) raises `DataError`. Not checked when the caller stops
    early (a crop): the frames kept were decoded.
    """
    import sphn

    try:
        reader = sphn.FileReader(str(path))
        rate, duration = int(reader.sample_rate), float(reader.duration_sec)
        decoded = 0
        if whole:
            pcm = reader.decode_all()
            decoded = pcm.shape[-1]
            yield torch.from_numpy(pcm).float().mean(0), rate
        else:
            expected = DECODE_PIECE_SECONDS * rate
            start = 0
            while start < duration:
                pcm = reader.decode(float(start), float(DECODE_PIECE_SECONDS))
                if pcm.shape[-1] > expected:
                    raise _InexactSeek(f"a {DECODE_PIECE_SECONDS} s piece decoded to {pcm.shape[-1]} samples")
                if pcm.shape[-1] == 0:
                    break
                decoded += pcm.shape[-1]
                yield torch.from_numpy(pcm).float().mean(0), rate
                if pcm.shape[-1] < expected:
                    break
                start += DECODE_PIECE_SECONDS
        seconds = decoded / rate
        if abs(seconds - duration) > tolerance_s:
            what = "truncated or corrupt" if seconds < duration else "corrupt"
            raise DataError(f"audio file {path} is {what}: its header declares {duration:.3f} s but {seconds:.3f} s "
                            f"decode (more than one frame, {tolerance_s:.3f} s, apart)")
    except (DataError, _InexactSeek):
        raise
    except Exception as exc:  # sphn raises plain ValueError/OSError for corrupt or unsupported files
        raise DataError(f"audio file {path} cannot be decoded: {one_line(exc)}") from exc


class _Resampler:
    """Band-limited rate conversion fed piece by piece: the output never depends on how the input was split.

    Why not sphn.resample: it works on whole buffers only (pieces would click at their seams), delays the signal
    (768 samples at 16 → 24 kHz) and pads its output to its block size, so frame counts would drift. Here output
    sample n sits at input position n·src/dst and is a Kaiser-windowed sinc sum over the input around it (cutoff
    at the lower Nyquist rate × ROLLOFF, ZERO_CROSSINGS lobes each side); input before 0 and after the end is
    silence, and there are exactly ceil(n_in · dst / src) output samples. Outputs are computed in fixed blocks of
    one second of input at fixed positions, so every block is the same computation however the input arrived.
    """

    ZERO_CROSSINGS = 16
    ROLLOFF = 0.9
    KAISER_BETA = 8.6

    def __init__(self, src: int, dst: int) -> None:
        g = math.gcd(src, dst)
        self.down, self.up = src // g, dst // g  # input / output samples per group
        self.block_in, self.block_out = src, dst  # one block = g groups = one second
        self.identity = src == dst
        bandwidth = min(1.0, self.up / self.down) * self.ROLLOFF  # in cycles per input sample, times 2
        half = self.ZERO_CROSSINGS / bandwidth  # kernel half-width in input samples
        self.width = math.ceil(half)
        taps = torch.arange(-self.width, self.width + self.down, dtype=torch.float64)  # offsets from q·down
        d = taps[None, :] - torch.arange(self.up, dtype=torch.float64)[:, None] * self.down / self.up
        window = torch.special.i0(self.KAISER_BETA * torch.sqrt((1 - (d / half) ** 2).clamp(min=0)))
        window = torch.where(d.abs() <= half, window / torch.special.i0(torch.tensor(self.KAISER_BETA)), 0.0)
        self.kernel = (bandwidth * torch.sinc(bandwidth * d) * window).float().T.contiguous()  # [taps, up]
        self.buffer = torch.zeros(self.width)  # input from absolute index start; silence before 0
        self.start = -self.width
        self.block = 0
        self.n_in = self.n_out = 0

    def push(self, x: torch.Tensor) -> torch.Tensor:
        self.n_in += x.numel()
        if self.identity:
            return x
        self.buffer = torch.cat([self.buffer, x.float()])
        return self._emit()

    def flush(self) -> torch.Tensor:
        """The remaining output, after the last input (pads the input with silence)."""
        if self.identity:
            return torch.empty(0)
        total = math.ceil(self.n_in * self.up / self.down)
        blocks = math.ceil(total / self.block_out)
        missing = blocks * self.block_in + self.width - (self.start + self.buffer.numel())
        self.buffer = torch.cat([self.buffer, torch.zeros(max(missing, 0))])
        done = self.n_out
        return self._emit()[: max(total - done, 0)]

    def _emit(self) -> torch.Tensor:
        out = []
        while self.start + self.buffer.numel() >= (self.block + 1) * self.block_in + self.width:
            offset = self.block * self.block_in - self.width - self.start
            segment = self.buffer[offset : offset + self.block_in + 2 * self.width]
            windows = segment.unfold(0, self.kernel.shape[0], self.down)  # [groups, taps]
            out.append((windows @ self.kernel).reshape(-1))  # [groups · up], in time order
            self.block += 1
            keep = self.block * self.block_in - self.width - self.start
            self.buffer, self.start = self.buffer[keep:], self.start + keep
        result = torch.cat(out) if out else torch.empty(0)
        self.n_out += result.numel()
        return result


# ---------------------------------------------------------------------------------------------------- cache


def _cache_key(path: Path, mimi_hash: str, num_codebooks: int) -> str:
    parts = f"{file_sha256(path)}|{mimi_hash}|{num_codebooks}|v{CACHE_VERSION}"
    return hashlib.sha256(parts.encode()).hexdigest()


def _read_cache(cache_dir: Path, key: str, num_codebooks: int) -> torch.Tensor | None:
    entry = cache_dir / f"{key}.safetensors"
    if not entry.is_file():
        return None
    from safetensors.torch import load_file

    try:
        codes = load_file(str(entry))["codes"]
    except Exception as exc:  # a damaged entry is re-encoded, not fatal
        log.warning("ignoring unreadable cache entry %s: %s", entry, one_line(exc))
        return None
    if codes.dim() != 2 or codes.shape[0] != num_codebooks:
        log.warning("ignoring cache entry %s of shape %s", entry, tuple(codes.shape))
        return None
    return codes.to(torch.int64)


def _write_cache(cache_dir: Path, key: str, codes: torch.Tensor, info: dict[str, Any]) -> None:
    """`<key>.safetensors` (key "codes") and a `<key>.json` sidecar, each written to a temp file then renamed."""
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    save_file({"codes": codes.contiguous()}, str(tmp))
    os.replace(tmp, cache_dir / f"{key}.safetensors")
    tmp.write_text(json.dumps(info | {"frames": int(codes.shape[1]), "cache_version": CACHE_VERSION}, indent=1))
    os.replace(tmp, cache_dir / f"{key}.json")
