"""Audio to codes: resampling, streaming Mimi encoding against one whole-file encode, the codes cache, bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from audio_fixtures import speech_like, write_audio, write_flac
from moshi.models.compression import MimiModel

from fused_stream.data.audio import _enlarge_encoder_caches, _Resampler, encode_audio_file
from fused_stream.data.dataset import load_dataset, load_sequences
from fused_stream.data.mimi import load_mimi, random_mimi, save_mimi_checkpoint, small_mimi_config
from fused_stream.errors import DataError

K, DEP_Q, CARD = 17, 8, 64  # the tiny preset: text + 8 Moshi audio + 8 user audio streams, audio card 64


# ------------------------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize("src", [8000, 16000, 22050, 44100, 48000])
def test_resampler_matches_the_sampled_signal_and_ignores_chunking(src):
    n = int(src * 1.37) + 3
    t = torch.arange(n, dtype=torch.float64) / src

    def signal(time):
        return 0.5 * torch.sin(2 * math.pi * 440 * time) + 0.3 * torch.sin(2 * math.pi * 1234.5 * time + 1)

    whole = _Resampler(src, 24000)
    out = torch.cat([whole.push(signal(t).float()), whole.flush()])
    assert out.numel() == math.ceil(n * 24000 / src)
    reference = signal(torch.arange(out.numel(), dtype=torch.float64) / 24000)
    inner = slice(1000, -1000)  # the signal starts and stops abruptly: edges ring
    assert (out[inner].double() - reference[inner]).abs().max() < 1e-4
    pieces, start, rng = _Resampler(src, 24000), 0, np.random.default_rng(0)
    chunks = []
    while start < n:
        step = int(rng.integers(1, src))
        chunks.append(pieces.push(signal(t[start : start + step]).float()))
        start += step
    assert torch.equal(torch.cat([*chunks, pieces.flush()]), out)  # bit for bit


# ------------------------------------------------------------------------------------------------ audio through Mimi

# (file, seconds, sample rate, channels) and the frame count by hand: T = ceil(seconds · 12.5)
AUDIO = [
    ("speech_16k.flac", 3.3, 16000, 1),  # 41.25 frames -> 42
    ("stereo_44k.wav", 2.5, 44100, 2),  # 31.25 -> 32
    ("native_24k.wav", 2.0, 24000, 1),  # exactly 25 (no resampling)
]
FRAMES = {"speech_16k": 42, "stereo_44k": 32, "native_24k": 25}


@pytest.fixture(scope="module")
def mimi_ckpt(tmp_path_factory):
    config = small_mimi_config(card=CARD)
    return save_mimi_checkpoint(random_mimi(config, seed=0), tmp_path_factory.mktemp("mimi") / "ckpt", config)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for i, (name, seconds, rate, channels) in enumerate(AUDIO):
        write_audio(root / name, seconds, rate, channels, seed=10 * i)
    return root


def test_flac_fixture_is_read_back_exactly(tmp_path):
    pcm = np.stack([speech_like(1.1, 16000), speech_like(1.1, 16000, seed=1)])
    write_flac(tmp_path / "x.flac", pcm, 16000)
    decoded, rate = sphn.read(str(tmp_path / "x.flac"))
    assert rate == 16000 and decoded.shape == pcm.shape
    np.testing.assert_array_equal(np.round(decoded * 32768), np.round(np.clip(pcm * 32767, -32768, 32767)))


def test_audio_to_codes_end_to_end(tiny_model, audio_dir, mimi_ckpt, tmp_path):
    sequences = load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=tmp_path / "cache")
    assert [s.name for s in sequences] == ["native_24k", "speech_16k", "stereo_44k"]
    for seq in sequences:
        assert seq.codes.dtype == torch.int64 and seq.codes.shape == (K, FRAMES[seq.name])
        assert seq.sources == [str(audio_dir / {"native_24k": "native_24k.wav", "speech_16k": "speech_16k.flac",
                                                 "stereo_44k": "stereo_44k.wav"}[seq.name])]
        audio = seq.codes[1:9]
        assert audio.min() >= 0 and audio.max() < CARD
        assert all(len(row.unique()) >= 4 for row in audio)  # a real spread of codes: comparisons mean something
        assert (seq.codes[0] == -1).all() and (seq.codes[9:] == -1).all()  # text and user streams: zero token


def _one_shot(mimi: MimiModel, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: decode the whole file, average channels, resample in one go, one non-streaming encode.

    Returns (codes [dep_q, T], unquantized latent [1, D, T])."""
    pcm, rate = sphn.read(str(path))
    mono = torch.from_numpy(pcm.mean(axis=0))
    if rate != 24000:
        resampler = _Resampler(rate, 24000)
        mono = torch.cat([resampler.push(mono), resampler.flush()])
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(mono.view(1, 1, -1))
        return mimi.quantizer.encode(latent)[0], latent


def _levels(mimi: MimiModel) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(rvq, vq layer) of every codebook level, in code order: the semantic level, then the acoustic ones."""
    first, rest = mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest
    return [(first, layer) for layer in first.vq.layers] + [(rest, layer) for layer in rest.vq.layers]


def _is_near_tie(mimi: MimiModel, latent: torch.Tensor, codes: torch.Tensor, level: int, frame: int, other: int):
    """Whether `other` is as close as codes[level, frame] to the residual at (level, frame), within float32 noise.

    Mimi picks codes with torch.cdist, i.e. |x|^2 - 2 x.e + |e|^2 in float32: its error is ~1e-7 |x|^2, so two
    codebook entries whose distances differ by less than that are a tie that rounding decides.
    """
    levels = _levels(mimi)
    rvq, layer = levels[level]
    with torch.no_grad():
        residual = rvq.input_proj(latent)
        for i in range(level):
            if levels[i][0] is rvq:
                residual = residual - levels[i][1].decode(codes[None, i : i + 1, :][0])
        x = layer.project_in(residual[0, :, frame]).double()
        embedding = layer._codebook.embedding.double()
    d_mine, d_other = ((x - embedding[codes[level, frame]]) ** 2).sum(), ((x - embedding[other]) ** 2).sum()
    return bool((d_mine - d_other).abs() <= 1e-5 * (x**2).sum())


def test_streaming_chunks_equal_one_encode_of_the_whole_file(audio_dir, mimi_ckpt, monkeypatch):
    """Streamed codes equal one encode of the whole file, except where float32 rounding decides a near tie."""
    monkeypatch.setattr("fused_stream.data.audio.ENCODE_CHUNK_FRAMES", 3)  # several chunks, a short last one
    monkeypatch.setattr("fused_stream.data.audio.DECODE_PIECE_SECONDS", 1)  # several decoded pieces per file
    mimi, digest = load_mimi(mimi_ckpt, DEP_Q)
    differing_frames = 0
    for name, *_ in AUDIO:
        streamed = encode_audio_file(mimi, audio_dir / name, num_codebooks=DEP_Q, mimi_hash=digest, cache_dir=None)
        reference, latent = _one_shot(mimi, audio_dir / name)
        assert streamed.shape == reference.shape == (DEP_Q, FRAMES[Path(name).stem])
        for frame in (streamed != reference).any(0).nonzero()[:, 0].tolist():
            level = int((streamed[:, frame] != reference[:, frame]).nonzero()[0])  # later levels follow from it
            assert _is_near_tie(mimi, latent, reference, level, frame, int(streamed[level, frame])), (name, frame)
            differing_frames += 1
    assert differing_frames <= 2  # of 99 frames
    # The tie test discriminates: among all 64 entries only the chosen one ties with itself at a sampled point.
    assert sum(_is_near_tie(mimi, latent, reference, 2, 4, code) for code in range(CARD)) == 1


def test_streaming_latents_match_past_the_attention_context(audio_dir, one_torch_thread):
    """With a context shorter than a chunk, the ring KV cache must hold context + chunk - 1 keys to be exact (one
    thread: two reduce in another order, 1e-7 apart)."""
    config = small_mimi_config(card=CARD)
    config["transformer"]["context"] = 8  # encoder steps (25 Hz); a 3-frame chunk is 6 steps
    mimi = random_mimi(config, seed=2)
    pcm, _ = sphn.read(str(audio_dir / "native_24k.wav"))
    x = torch.from_numpy(pcm).view(1, 1, -1)  # 25 frames of 1920 samples
    chunk = 3 * mimi.frame_size
    with torch.no_grad():
        reference = mimi._encode_to_unquantized_latent(x)
        with mimi.streaming(1):
            _enlarge_encoder_caches(mimi, chunk)
            pieces = [mimi._encode_to_unquantized_latent(x[..., i : i + chunk])
                      for i in range(0, 24 * mimi.frame_size, chunk)]
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape[-1] == 24
    assert (streamed - reference[..., :24]).abs().max() <= 1e-6 * reference.abs().max()


def test_cache_hit_skips_mimi_and_misses_on_other_settings(tiny_model, audio_dir, mimi_ckpt, tmp_path, encode_calls):
    cache = tmp_path / "cache"
    first = load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=cache)
    assert len(encode_calls) > 0
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 3 and len(list(cache.glob("*.json"))) == 3 and not list(cache.glob(".*"))
    sources = {json.loads(e.with_suffix(".json").read_text())["source"] for e in entries}
    assert sources == {str(audio_dir / name) for name, *_ in AUDIO}

    encode_calls.clear()
    again = load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=cache)
    assert encode_calls == []
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(first, again, strict=True))
    cropped = load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=cache, max_frames=10)
    assert encode_calls == []
    assert all(torch.equal(c.codes, a.codes[:, :10]) for c, a in zip(cropped, first, strict=True))

    mimi, digest = load_mimi(mimi_ckpt, DEP_Q)
    file = audio_dir / "speech_16k.flac"
    fewer = encode_audio_file(mimi, file, num_codebooks=4, mimi_hash=digest, cache_dir=cache)
    assert len(encode_calls) > 0  # another num_codebooks: a miss
    assert torch.equal(fewer, first[1].codes[1:5])  # residual VQ: the first 4 levels do not depend on the rest

    other_config = small_mimi_config(card=CARD)
    other = save_mimi_checkpoint(random_mimi(other_config, seed=1), tmp_path / "other", other_config)
    encode_calls.clear()
    changed = load_sequences(tiny_model, audio=file, mimi=other, cache_dir=cache)
    assert len(encode_calls) > 0 and not torch.equal(changed[0].codes, first[1].codes)
    assert len(list(cache.glob("*.safetensors"))) == 3 + 1 + 1

    entries[0].write_bytes(b"not safetensors")  # a damaged entry is encoded again and rewritten
    encode_calls.clear()
    repaired = load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=cache)
    assert len(encode_calls) > 0 and all(torch.equal(a.codes, b.codes) for a, b in zip(first, repaired, strict=True))
    encode_calls.clear()
    load_sequences(tiny_model, audio=audio_dir, mimi=mimi_ckpt, cache_dir=cache)
    assert encode_calls == []
    with pytest.raises(DataError, match="asked for num_codebooks=9"):
        encode_audio_file(mimi, file, num_codebooks=9, mimi_hash=digest, cache_dir=cache)


def test_max_frames_crops_without_a_cache(tiny_model, audio_dir, mimi_ckpt, monkeypatch, encode_calls):
    monkeypatch.setattr("fused_stream.data.audio.ENCODE_CHUNK_FRAMES", 5)  # as the full run: bit-identical frames
    full = load_sequences(tiny_model, audio=audio_dir / "speech_16k.flac", mimi=mimi_ckpt)[0]
    assert len(encode_calls) == 9  # ceil(42 / 5)
    encode_calls.clear()
    cropped = load_sequences(tiny_model, audio=audio_dir / "speech_16k.flac", mimi=mimi_ckpt, max_frames=12)[0]
    assert cropped.name == "speech_16k" and torch.equal(cropped.codes, full.codes[:, :12])
    assert len(encode_calls) == 3  # 3 chunks of 5 frames reach 12; the other 27 frames are never encoded


def test_bad_audio_files_are_named(tiny_model, mimi_ckpt, tmp_path):
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=f"audio file {corrupt} cannot be decoded"):
        load_sequences(tiny_model, audio=corrupt, mimi=mimi_ckpt)
    empty = tmp_path / "empty.wav"
    sphn.write_wav(str(empty), np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match=f"audio file {empty} holds no samples"):
        load_sequences(tiny_model, audio=empty, mimi=mimi_ckpt)
    with pytest.raises(DataError, match="audio path .*missing does not exist"):
        load_sequences(tiny_model, audio=tmp_path / "missing", mimi=mimi_ckpt)


def _truncated(path: Path, seconds: float, keep: float, rate: int = 16000) -> Path:
    """A real `seconds`-long file of `path`'s format, then its bytes cut to the first `keep` fraction."""
    write_audio(path, seconds, rate, 1)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_what_sphn_does_with_a_truncated_flac(tmp_path):
    """Why the length check exists: sphn reads the header's duration and decodes what is there, without an error."""
    flac = _truncated(tmp_path / "cut.flac", 12.0, 0.025)
    assert sphn.durations([str(flac)]) == [12.0]
    reader = sphn.FileReader(str(flac))
    assert reader.duration_sec == 12.0 and reader.decode(0.0, 30.0).shape == (1, 4096)  # 0.256 s: 4 frames


@pytest.mark.parametrize("name, keep", [("cut.flac", 0.025), ("half.flac", 0.5), ("cut.wav", 0.3)])
def test_truncated_audio_is_refused_not_shortened(tiny_model, mimi_ckpt, tmp_path, name, keep):
    path = _truncated(tmp_path / name, 12.0, keep)
    mimi, digest = load_mimi(mimi_ckpt, DEP_Q)
    with pytest.raises(DataError, match=rf"^audio file {path} is truncated or corrupt: its header declares 12\.000 s "
                                        r"but \d\.\d+ s decode \(more than one frame, 0\.080 s, apart\)$"):
        encode_audio_file(mimi, path, num_codebooks=DEP_Q, mimi_hash=digest, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # never cached as if whole


def test_truncated_file_fails_alone_in_collect_mode(tiny_model, mimi_ckpt, tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    write_audio(root / "good.flac", 1.0, 16000, 1)
    _truncated(root / "truncated.flac", 12.0, 0.025)
    data = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, on_error="collect")
    assert [(s.name, s.frames) for s in data.sequences] == [("good", 13)]
    (failure,) = data.failed
    assert failure["name"] == "truncated" and "truncated.flac is truncated or corrupt" in failure["reason"]
    cropped = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, max_frames=2, on_error="collect")
    assert [s.name for s in cropped.sequences] == ["good"]  # the cut lies within the first chunk decoded
    # Without a cache, a crop that ends well before the cut (6 s of 12 remain) decodes and evaluates intact
    # frames only and never reaches the cut: those frames are what was asked for.
    _truncated(root / "truncated.flac", 12.0, 0.5)
    cropped = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, max_frames=2, on_error="collect")
    assert [(s.name, s.frames) for s in cropped.sequences] == [("good", 2), ("truncated", 2)]
    assert [f["name"] for f in load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, on_error="collect").failed] == [
        "truncated"]
