"""data/dataset.py: a run's sequences from each source, bad files raised or collected, min_frames, rank shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_fixtures import write_audio
from codes_fixtures import CARD, SUFFIX, audio_codes, save_codes

from fused_stream.data.codes import generate_codes
from fused_stream.data.dataset import assign_shards, load_dataset, load_sequences
from fused_stream.data.mimi import load_mimi, random_mimi, save_mimi_checkpoint, small_mimi_config
from fused_stream.errors import DataError


def test_generated_sequences(tiny_model):
    sequences = load_sequences(tiny_model, generate=3, frames=20, seed=4, max_frames=15)
    reference = generate_codes(tiny_model, 3, 20, seed=4)
    assert [s.name for s in sequences] == ["generated_0", "generated_1", "generated_2"]
    assert all(torch.equal(s.codes, reference[i, :, :15]) for i, s in enumerate(sequences))
    assert len(load_sequences(tiny_model, generate=3, frames=20, max_files=2)) == 2
    with pytest.raises(DataError, match=r"max_files \(--max-files\) must be >= 1"):
        load_sequences(tiny_model, generate=3, max_files=0)
    with pytest.raises(DataError, match=r"max_frames \(--max-frames\) must be >= 1"):
        load_sequences(tiny_model, generate=3, max_frames=0)


def test_exactly_one_source(tiny_model, tmp_path):
    with pytest.raises(DataError, match="exactly one of"):
        load_sequences(tiny_model)
    with pytest.raises(DataError, match="exactly one of"):
        load_sequences(tiny_model, generate=1, codes=tmp_path)
    with pytest.raises(DataError, match=r"audio \(--audio\) needs mimi \(--mimi\)"):
        load_sequences(tiny_model, audio=tmp_path)
    with pytest.raises(DataError, match="codes path .* does not exist"):
        load_sequences(tiny_model, codes=tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ audio files and books


@pytest.fixture(scope="module")
def mimi_ckpt(tmp_path_factory):
    config = small_mimi_config(card=CARD)
    return save_mimi_checkpoint(random_mimi(config, seed=0), tmp_path_factory.mktemp("mimi") / "ckpt", config)


def test_librilight_books_are_concatenated_in_chapter_order(tiny_model, mimi_ckpt, tmp_path):
    root = tmp_path / "librilight"
    layout = {"103/bookA/chapter_10.flac": 1.0, "103/bookA/chapter_2.flac": 1.2, "103/bookA/chapter_1.flac": 0.8,
              "20/bookB/only.flac": 1.0, "loose.wav": 0.6}
    for i, (rel, seconds) in enumerate(layout.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_audio(root / rel, seconds, 16000, 1, seed=i)
    files = load_sequences(tiny_model, audio=root, mimi=mimi_ckpt)
    by_name = {s.name: s.codes for s in files}
    assert [s.name for s in files] == ["20/bookB/only", "103/bookA/chapter_1", "103/bookA/chapter_2",
                                       "103/bookA/chapter_10", "loose"]
    assert [s.frames for s in files] == [13, 10, 15, 13, 8]  # ceil(1.0, 0.8, 1.2, 1.0, 0.6 s x 12.5)

    books = load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True)
    assert [s.name for s in books] == ["20/bookB", "103/bookA", "loose"]
    book = books[1]
    chapters = [f"103/bookA/chapter_{i}" for i in (1, 2, 10)]
    assert book.sources == [str(root / f"{c}.flac") for c in chapters]
    assert torch.equal(book.codes, torch.cat([by_name[c] for c in chapters], dim=1)) and book.frames == 38

    first_two = load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True, max_files=2)
    assert [s.name for s in first_two] == ["20/bookB", "103/bookA"] and torch.equal(first_two[1].codes, book.codes)
    assert [s.name for s in load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, max_files=2)] == [
        "20/bookB/only", "103/bookA/chapter_1"]

    cropped = load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True, max_frames=12)[1]
    assert cropped.sources == book.sources[:2]  # chapter_10 lies past frame 12: never encoded
    assert torch.equal(cropped.codes, book.codes[:, :12])


def test_mimi_that_does_not_fit_the_model(tiny_model, tmp_path):
    audio = tmp_path / "a.wav"
    write_audio(audio, 0.5, 16000, 1)  # never decoded: the checkpoint's config is checked first
    for name, config in [("card32", small_mimi_config(card=32)), ("four", small_mimi_config(card=CARD, n_q=4))]:
        ckpt = save_mimi_checkpoint(random_mimi(config), tmp_path / name, config)
        card, n_q = config["quantizer"]["bins"], config["quantizer"]["n_q"]
        with pytest.raises(DataError, match=f"has {n_q} codebooks of card {card}; the model expects dep_q=8 of "
                                            "card 64"):
            load_sequences(tiny_model, audio=audio, mimi=ckpt)
    with pytest.raises(DataError, match="has 4 codebooks of card 64; asked for num_codebooks=8"):
        load_mimi(tmp_path / "four", 8)


# ------------------------------------------------------------------------------------------------ bad files, min_frames


def _codes_dir(root: Path, lengths: list[int], model, kinds=("pt", "npy", "safetensors")) -> list[torch.Tensor]:
    """s0..s{n-1} holding full-layout codes of the given lengths, in rotating formats; returns the codes."""
    root.mkdir(parents=True, exist_ok=True)
    codes = generate_codes(model, len(lengths), lengths, seed=3)
    for i, c in enumerate(codes):
        kind = kinds[i % len(kinds)]
        save_codes(root / f"s{i}{SUFFIX[kind]}", c, kind)
    return codes


def test_collect_skips_bad_codes_files_and_raise_stops(tmp_path, tiny_model):
    save_codes(tmp_path / "a.pt", audio_codes(seed=1), "pt")
    (tmp_path / "b.safetensors").write_bytes(b"\x00" * 40)  # corrupt
    save_codes(tmp_path / "c.npy", audio_codes(seed=2), "npy")
    torch.save(torch.zeros(2, 8, 5, dtype=torch.long), tmp_path / "d.pt")  # wrong shape
    out_of_card = audio_codes(seed=3)
    out_of_card[4, 6] = CARD
    save_codes(tmp_path / "e.pt", out_of_card, "pt")
    save_codes(tmp_path / "f.pt", audio_codes(seed=4), "pt")

    data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    assert [(s.name, s.index) for s in data.sequences] == [("a", 0), ("c", 2), ("f", 5)] and data.total == 6
    assert torch.equal(data.sequences[1].codes[1:9], audio_codes(seed=2))
    assert [(f["index"], f["name"], f["sources"]) for f in data.failed] == [
        (1, "b", [str(tmp_path / "b.safetensors")]), (3, "d", [str(tmp_path / "d.pt")]),
        (4, "e", [str(tmp_path / "e.pt")])]
    reasons = [f["reason"] for f in data.failed]
    assert "unreadable" in reasons[0] and "shape (2, 8, 5)" in reasons[1] and "token 64 at row 4, frame 6" in reasons[2]
    assert all(f"{tmp_path}/" in r and "\n" not in r for r in reasons)  # each names its file, on one line
    assert [s.name for s in load_sequences(tiny_model, codes=tmp_path, on_error="collect")] == ["a", "c", "f"]
    with pytest.raises(DataError, match="b.safetensors is unreadable"):
        load_sequences(tiny_model, codes=tmp_path)  # "raise" is the default
    with pytest.raises(DataError, match="has shape"):
        load_dataset(tiny_model, codes=tmp_path / "d.pt", on_error="raise")


def test_configuration_errors_raise_in_collect_mode(tmp_path, tiny_model):
    save_codes(tmp_path / "a.pt", audio_codes(), "pt")
    for options, message in [({"codes": tmp_path / "missing"}, "does not exist"),
                             ({"codes": tmp_path, "text_fill": "blank"}, "text fill"),
                             ({"codes": tmp_path, "min_frames": 0}, r"min_frames \(--min-frames\) must be >= 1"),
                             ({"codes": tmp_path, "shard": (2, 2)}, "0 <= rank < world_size"),
                             ({"generate": 2, "shard": (0, 0)}, "0 <= rank < world_size")]:
        with pytest.raises(DataError, match=message):
            load_dataset(tiny_model, on_error="collect", **options)
    with pytest.raises(DataError, match="on_error must be 'raise' or 'collect'"):
        load_dataset(tiny_model, codes=tmp_path, on_error="skip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_dataset(tiny_model, codes=tmp_path / "empty", on_error="collect")


def test_min_frames_counts_before_the_crop(tmp_path, tiny_model):
    _codes_dir(tmp_path, [120, 30, 60], tiny_model)
    data = load_dataset(tiny_model, codes=tmp_path, min_frames=60, max_frames=20, on_error="collect")
    assert [(s.name, s.frames) for s in data.sequences] == [("s0", 20), ("s2", 20)]  # 60 frames pass, then cropped
    assert data.failed == [{"index": 1, "name": "s1", "sources": [str(tmp_path / "s1.npy")],
                            "reason": "30 frames, shorter than min_frames (--min-frames) 60"}]
    with pytest.raises(DataError, match=r"^s1 \(.*s1.npy\): 30 frames, shorter than min_frames \(--min-frames\) 60$"):
        load_sequences(tiny_model, codes=tmp_path, min_frames=60)
    assert len(load_sequences(tiny_model, generate=2, frames=5, min_frames=5)) == 2
    with pytest.raises(DataError, match=r"generated_0 .*4 frames, shorter than min_frames \(--min-frames\) 5"):
        load_sequences(tiny_model, generate=2, frames=4, min_frames=5)


def _write_tree(root: Path, layout: dict[str, float]) -> None:
    for i, (rel, seconds) in enumerate(layout.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if seconds < 0:  # a corrupt file
            (root / rel).write_bytes(np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        else:
            write_audio(root / rel, seconds, 16000, 1, seed=i)


def test_collect_skips_bad_audio_and_fails_the_whole_book(tiny_model, mimi_ckpt, tmp_path, monkeypatch):
    root = tmp_path / "ll"
    _write_tree(root, {"1/bk/ch_1.flac": 0.4, "1/bk/ch_2.flac": -1, "1/bk/ch_3.flac": 0.3, "2/bk/ch_1.wav": 0.5,
                       "3/bk/ch_1.wav": 0.3})
    files = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, on_error="collect")
    assert [(s.name, s.index, s.frames) for s in files.sequences] == [
        ("1/bk/ch_1", 0, 5), ("1/bk/ch_3", 2, 4), ("2/bk/ch_1", 3, 7), ("3/bk/ch_1", 4, 4)]
    (failure,) = files.failed
    assert failure["name"] == "1/bk/ch_2" and failure["index"] == 1
    assert failure["reason"].startswith(f"audio file {root / '1/bk/ch_2.flac'} cannot be decoded")

    books = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True, on_error="collect")
    assert [(s.name, s.index) for s in books.sequences] == [("2/bk", 1), ("3/bk", 2)]
    (failure,) = books.failed
    assert failure["name"] == "1/bk" and failure["sources"] == [str(root / f"1/bk/ch_{i}.flac") for i in (1, 2, 3)]
    assert "1/bk/ch_2.flac cannot be decoded" in failure["reason"]  # the reason names the bad chapter
    with pytest.raises(DataError, match="ch_2.flac cannot be decoded"):
        load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True)

    import fused_stream.data.sources.audio as data_module  # the audio source encodes (data/sources/audio.py)

    real = data_module.encode_audio_file

    def mimi_fails_on_2(mimi, path, **kw):
        if "2/bk" in str(path):
            raise RuntimeError("shape mismatch\nin conv")
        return real(mimi, path, **kw)

    monkeypatch.setattr(data_module, "encode_audio_file", mimi_fails_on_2)
    broken = load_dataset(tiny_model, audio=root / "2", mimi=mimi_ckpt, on_error="collect")
    assert broken.sequences == [] and broken.failed[0]["reason"] == (
        f"audio file {root / '2/bk/ch_1.wav'} cannot be encoded: RuntimeError: shape mismatch in conv")


def test_a_gpu_fault_while_encoding_is_raised_not_blamed_on_the_file(tiny_model, mimi_ckpt, tmp_path, monkeypatch):
    """A device-side assert is no file's fault (and every later file would fail too): it is not collected."""
    import fused_stream.data.sources.audio as data_module  # the audio source encodes (data/sources/audio.py)

    root = tmp_path / "ll"
    _write_tree(root, {"1/bk/ch_1.wav": 0.3, "2/bk/ch_1.wav": 0.3})
    fault = RuntimeError("CUDA error: device-side assert triggered")

    def device_fails(mimi, path, **kw):
        raise fault

    monkeypatch.setattr(data_module, "encode_audio_file", device_fails)
    with pytest.raises(RuntimeError) as info:
        load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, on_error="collect")
    assert info.value is fault


def test_min_frames_past_max_frames_encodes_far_enough(tiny_model, mimi_ckpt, tmp_path):
    root = tmp_path / "ll"
    _write_tree(root, {"1/bk/ch_1.wav": 0.4, "1/bk/ch_2.wav": 0.5, "2/bk/ch_1.wav": 0.4})  # 5 + 7 and 5 frames
    books = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True, max_frames=3, min_frames=8,
                         on_error="collect")
    (book,) = books.sequences
    assert book.name == "1/bk" and book.frames == 3 and book.sources == [str(root / "1/bk/ch_1.wav")]
    assert books.failed[0]["name"] == "2/bk"
    assert books.failed[0]["reason"] == "5 frames, shorter than min_frames (--min-frames) 8"


# ------------------------------------------------------------------------------------------------ sharding


def test_assign_shards_by_hand():
    lengths, names = [5, 9, 3, 7, 7, 2, 8], [f"s{i}" for i in range(7)]
    # longest first: s1 9, s6 8, s3 7, s4 7 (tie: by name), s0 5, s2 3, s5 2
    # 2 ranks: s1→0 (9), s6→1 (8), s3→1 (15), s4→0 (16), s0→1 (20), s2→0 (19), s5→0 (21)
    assert assign_shards(lengths, names, 2) == [[1, 2, 4, 5], [0, 3, 6]]
    # 3 ranks: s1→0 (9), s6→1 (8), s3→2 (7), s4→2 (14), s0→1 (13), s2→0 (12), s5→0 (14)
    assert assign_shards(lengths, names, 3) == [[1, 2, 5], [0, 6], [3, 4]]
    assert assign_shards([4] * 4, ["x_10", "x_2", "x_1", "x_3"], 3) == [[0, 2], [1], [3]]  # ties: natural name order
    assert assign_shards([1, 2], ["a", "b"], 4) == [[1], [0], [], []]
    assert assign_shards([], [], 2) == [[], []]


@pytest.mark.parametrize("world", [2, 3])
def test_codes_shards_partition_the_full_list(tmp_path, tiny_model, world):
    lengths = [50, 90, 30, 70, 70, 20, 80]  # 10 x the lengths by hand above (files have >= 17 frames: K rows)
    codes = _codes_dir(tmp_path, lengths, tiny_model)
    full = load_dataset(tiny_model, codes=tmp_path)
    shards = [load_dataset(tiny_model, codes=tmp_path, shard=(rank, world)) for rank in range(world)]
    expected = assign_shards(lengths, [f"s{i}" for i in range(7)], world)  # checked by hand above
    for rank, part in enumerate(shards):
        assert [s.index for s in part.sequences] == expected[rank] and part.total == 7  # data order within a rank
        assert [s.name for s in part.sequences] == [f"s{i}" for i in expected[rank]]
        assert all(torch.equal(s.codes, codes[s.index]) for s in part.sequences)
    merged = sorted((s for part in shards for s in part.sequences), key=lambda s: s.index)
    assert [(s.name, s.index) for s in merged] == [(s.name, s.index) for s in full.sequences]  # no overlap, no gap
    totals = [sum(s.frames for s in part.sequences) for part in shards]
    assert totals == ([210, 200] if world == 2 else [140, 130, 140])


def test_shard_estimates_cap_at_max_frames_and_bad_files_fail_on_their_owner(tmp_path, tiny_model):
    _codes_dir(tmp_path, [50, 90, 30, 70], tiny_model)
    (tmp_path / "s4.pt").write_bytes(b"junk")  # estimate 0: still assigned, fails only where owned
    # max_frames=40 caps the estimates to [40, 40, 30, 40, 0]: s0→0, s1→1, s3→0 (80), s2→1 (70), s4→1 (70)
    parts = [load_dataset(tiny_model, codes=tmp_path, max_frames=40, shard=(r, 2), on_error="collect")
             for r in (0, 1)]
    assert [[s.name for s in p.sequences] for p in parts] == [["s0", "s3"], ["s1", "s2"]]
    assert parts[0].failed == [] and [f["name"] for f in parts[1].failed] == ["s4"]


def test_max_files_applies_before_sharding(tmp_path, tiny_model):
    _codes_dir(tmp_path, [50, 90, 30, 70, 70, 20, 80], tiny_model)
    parts = [load_dataset(tiny_model, codes=tmp_path, max_files=4, shard=(r, 2)) for r in (0, 1)]
    # the first 4 of the full list, [50, 90, 30, 70]: s1→0 (90), s3→1 (70), s0→1 (120), s2→0 (120)
    assert [[s.name for s in p.sequences] for p in parts] == [["s1", "s2"], ["s0", "s3"]]
    assert all(p.total == 4 for p in parts)
    generated = [load_sequences(tiny_model, generate=5, frames=6, max_files=3, shard=(r, 2)) for r in (0, 1)]
    assert [[s.name for s in g] for g in generated] == [["generated_0", "generated_2"], ["generated_1"]]


def test_audio_ranks_encode_only_their_own_files(tiny_model, mimi_ckpt, tmp_path, monkeypatch):
    root = tmp_path / "audio"
    _write_tree(root, {"a.wav": 1.0, "b.wav": 0.4, "c.wav": 0.8, "d.wav": 0.6, "e.flac": -1})
    import fused_stream.data.sources.audio as data_module  # the audio source encodes (data/sources/audio.py)

    encoded: list[str] = []
    real = data_module.encode_audio_file

    def spy(mimi, path, **kw):
        encoded.append(Path(path).name)
        return real(mimi, path, **kw)

    monkeypatch.setattr(data_module, "encode_audio_file", spy)
    # durations give 13, 5, 10, 8 frames and 0 for the corrupt e: a→0, c→1, d→1 (18), b→0 (18), e→0 (18)
    owned = [["a.wav", "b.wav", "e.flac"], ["c.wav", "d.wav"]]
    parts = []
    for rank in (0, 1):
        encoded.clear()
        cache = tmp_path / f"cache{rank}"
        part = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, cache_dir=cache, shard=(rank, 2),
                            on_error="collect")
        assert sorted(encoded) == owned[rank]  # never a file of the other rank
        cached = {Path(json.loads(p.read_text())["source"]).name for p in cache.glob("*.json")}
        assert cached == {name for name in owned[rank] if name != "e.flac"}
        parts.append(part)
    assert [[s.name for s in p.sequences] for p in parts] == [["a", "b"], ["c", "d"]]
    assert [f["name"] for f in parts[0].failed] == ["e"] and parts[1].failed == []
    full = load_dataset(tiny_model, audio=root, mimi=mimi_ckpt, cache_dir=tmp_path / "cache0", on_error="collect")
    merged = sorted((s for p in parts for s in p.sequences), key=lambda s: s.index)
    assert [(s.name, s.index) for s in merged] == [(s.name, s.index) for s in full.sequences]
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(merged, full.sequences, strict=True))


# ------------------------------------------------------------------------------------------------ invalid tokens


def _codes_with_a_bad_text_token(root: Path, model) -> list[torch.Tensor]:
    """s0..s2, full layouts of 30 frames; s1 holds text token text_card at frame 5 (and a later one)."""
    codes = _codes_dir(root, [30, 30, 30], model, kinds=("pt",))
    codes[1][0, 5] = model.text_card
    codes[1][0, 9] = model.text_card + 3
    torch.save(codes[1].clone(), root / "s1.pt")
    return codes


def test_an_invalid_token_fails_its_file_not_the_run(tmp_path, tiny_model):
    codes = _codes_with_a_bad_text_token(tmp_path, tiny_model)
    data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")  # invalid_tokens: EvalConfig's "raise"
    assert [s.name for s in data.sequences] == ["s0", "s2"]
    (failure,) = data.failed
    assert failure["name"] == "s1" and failure["sources"] == [str(tmp_path / "s1.pt")]
    reason = failure["reason"]
    assert reason.startswith(f"{tmp_path / 's1.pt'}: invalid token 96 in stream 0 (text), frame 5: ")
    assert "--invalid-tokens mask" in reason and "invalid_tokens='mask'" in reason and "batch index" not in reason
    with pytest.raises(DataError, match=r"s1\.pt: invalid token 96 in stream 0 \(text\), frame 5"):
        load_dataset(tiny_model, codes=tmp_path)
    masked = load_dataset(tiny_model, codes=tmp_path, invalid_tokens="mask", on_error="collect")
    assert masked.failed == [] and torch.equal(masked.sequences[1].codes, codes[1])  # the evaluator masks, counts
    with pytest.raises(DataError, match="invalid_tokens must be one of raise, mask, got 'drop'"):
        load_dataset(tiny_model, codes=tmp_path, invalid_tokens="drop", on_error="collect")


def test_mask_applies_to_audio_tokens_of_audio_only_files_and_nothing_blames_mimi(tmp_path, tiny_model):
    """An audio-only codes file [8, T] with a token >= card: "raise" fails that file naming the token and the
    --invalid-tokens mask fix (a codes file is not Mimi's output, so Mimi is not blamed); "mask" loads it and the
    evaluator masks and counts that token like any other."""
    from fused_stream.core.inputs import check_codes

    audio = audio_codes(T=30, seed=4)
    audio[2, 7] = CARD + 5
    save_codes(tmp_path / "a.pt", audio, "pt")
    strict = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    reason = strict.failed[0]["reason"]
    assert "audio token 69 at row 2, frame 7" in reason and "--invalid-tokens mask" in reason
    assert "Mimi" not in reason
    masked = load_dataset(tiny_model, codes=tmp_path, invalid_tokens="mask", on_error="collect")
    assert masked.failed == [] and int(masked.sequences[0].codes[3, 7]) == CARD + 5  # stream 1 + row 2
    checked = check_codes(tiny_model, [masked.sequences[0].codes], invalid_tokens="mask")
    assert checked.n_masked_tokens == 1 and int(checked.sequences[0][3, 7]) == tiny_model.zero_token_id


def test_cli_records_the_file_with_an_invalid_token_and_evaluates_the_others(tmp_path, tiny_model, capsys):
    from fused_stream.cli.main import main

    _codes_with_a_bad_text_token(tmp_path / "data", tiny_model)
    common = ["--codes", str(tmp_path / "data"), "-q", "--no-verify", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "out")]) == 1  # a bad file: recorded, the rest evaluated
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [d["name"] for d in results["data"]] == ["s0", "s2"]
    (failure,) = results["failed"]
    assert failure["name"] == "s1" and "s1.pt: invalid token 96 in stream 0 (text), frame 5" in failure["reason"]
    assert "--invalid-tokens mask" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "masked"), "--invalid-tokens", "mask"]) == 0
    masked = json.loads((tmp_path / "masked" / "results.json").read_text())
    assert [d["name"] for d in masked["data"]] == ["s0", "s1", "s2"] and masked["failed"] == []


# ------------------------------------------------------------------------------------------------ books from any level


def test_concat_chapters_from_a_speaker_folder_and_a_book_folder(tiny_model, mimi_ckpt, tmp_path):
    root = tmp_path / "ll"
    _write_tree(root, {"7/bk/ch_2.wav": 0.4, "7/bk/ch_10.wav": 0.3, "7/bk/ch_1.wav": 0.5, "7/other/a.wav": 0.3,
                       "8/x/only.wav": 0.3})
    cache = tmp_path / "cache"
    full = {s.name: s for s in load_sequences(tiny_model, audio=root, mimi=mimi_ckpt, concat_chapters=True,
                                              cache_dir=cache)}
    assert list(full) == ["7/bk", "7/other", "8/x"]
    book = full["7/bk"]
    assert book.sources == [str(root / f"7/bk/ch_{i}.wav") for i in (1, 2, 10)] and book.frames == 7 + 5 + 4
    speaker = load_sequences(tiny_model, audio=root / "7", mimi=mimi_ckpt, concat_chapters=True, cache_dir=cache)
    assert [s.name for s in speaker] == ["7/bk", "7/other"]  # before: 4 sequences, one per chapter
    assert torch.equal(speaker[0].codes, book.codes) and speaker[0].sources == book.sources
    (one,) = load_sequences(tiny_model, audio=root / "7" / "bk", mimi=mimi_ckpt, concat_chapters=True,
                            cache_dir=cache)
    assert one.name == "7/bk" and torch.equal(one.codes, book.codes) and one.sources == book.sources
    (single,) = load_sequences(tiny_model, audio=root / "7/bk/ch_2.wav", mimi=mimi_ckpt, concat_chapters=True,
                               cache_dir=cache)
    assert single.name == "ch_2" and single.frames == 5  # one file: itself


# ------------------------------------------------------------------------------------ duplicates, nothing to score


def test_identical_content_under_two_paths_counts_once_unless_allowed(tmp_path, tiny_model, caplog):
    """A copy and a hard link of a.pt hold a's content: left out with a warning naming both, listed as duplicates;
    a different file of the same size is read. --allow-duplicates (allow_duplicates=True) reads every path."""
    import os

    save_codes(tmp_path / "a.pt", audio_codes(T=30, seed=1), "pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())  # a copy
    os.link(tmp_path / "a.pt", tmp_path / "c.pt")  # a hard link
    save_codes(tmp_path / "d.pt", audio_codes(T=30, seed=2), "pt")  # same size, other content
    assert (tmp_path / "d.pt").stat().st_size == (tmp_path / "a.pt").stat().st_size
    with caplog.at_level("WARNING", logger="fused_stream.data.dataset"):
        data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    assert [s.name for s in data.sequences] == ["a", "d"] and data.failed == []
    assert [(d["name"], d["same_as"]) for d in data.duplicates] == [("b", "a"), ("c", "a")]
    assert "b has the same content as a" in caplog.text and "--allow-duplicates" in caplog.text
    every = load_dataset(tiny_model, codes=tmp_path, on_error="collect", allow_duplicates=True)
    assert [s.name for s in every.sequences] == ["a", "b", "c", "d"] and every.duplicates == []


def test_the_cli_counts_a_copied_file_once(tmp_path, tiny_model):
    from fused_stream.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    save_codes(data / "a.pt", audio_codes(T=30, seed=1), "pt")
    (data / "copy.pt").write_bytes((data / "a.pt").read_bytes())
    common = ["--codes", str(data), "-q", "--no-verify", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "once")]) == 0
    assert [d["name"] for d in json.loads((tmp_path / "once" / "results.json").read_text())["data"]] == ["a"]
    assert main([*common, "--out", str(tmp_path / "both"), "--allow-duplicates"]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())["data"]
    assert [d["name"] for d in both] == ["a", "copy"]


def test_a_sequence_with_nothing_to_score_fails_with_that_reason(tmp_path, tiny_model):
    """Audio rows all the zero token (and the text stream filled with it): no position is scored, so the sequence is
    a failed file ("nothing to score"), not a unit counted in n_sequences with no loss; with the text stream filled
    with the padding id (scored as text) it is evaluated."""
    save_codes(tmp_path / "a.pt", audio_codes(T=30, seed=1), "pt")
    save_codes(tmp_path / "silent.pt", torch.full((8, 30), -1, dtype=torch.long), "pt")
    data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    assert [s.name for s in data.sequences] == ["a"]
    (failure,) = data.failed
    assert failure["name"] == "silent" and failure["reason"].startswith("nothing to score")
    with pytest.raises(DataError, match="silent .*nothing to score"):
        load_dataset(tiny_model, codes=tmp_path)
    padded = load_dataset(tiny_model, codes=tmp_path, on_error="collect", text_fill="pad")
    assert [s.name for s in padded.sequences] == ["a", "silent"]
