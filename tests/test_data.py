"""Data: synthetic codes, code files, stream layout, audio file listing, LibriLight books, the sequences of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from audio_fixtures import write_audio
from safetensors.torch import save_file

from fused_stream.data import (
    DataError,
    audio_files,
    codes_files,
    generate_codes,
    group_chapters,
    layout_codes,
    load_codes_file,
    load_mimi,
    load_sequences,
    random_mimi,
    save_mimi_checkpoint,
    small_mimi_config,
)


def test_tensor_layout_and_token_ranges(tiny_model):
    codes = generate_codes(tiny_model, 3, 50, seed=1)
    assert codes.shape == (3, tiny_model.num_codebooks, 50) and codes.dtype == torch.long
    assert codes[:, 0].min() >= 0 and codes[:, 0].max() < tiny_model.text_card
    assert codes[:, 1:].min() >= 0 and codes[:, 1:].max() < tiny_model.card
    assert codes[:, 0].max() >= tiny_model.card  # text draws from its own, larger vocabulary


def test_lengths_give_a_list_and_seeds_repeat(tiny_model):
    first = generate_codes(tiny_model, 2, [7, 3], seed=5)
    again = generate_codes(tiny_model, 2, [7, 3], seed=5)
    other = generate_codes(tiny_model, 2, [7, 3], seed=6)
    assert [c.shape[1] for c in first] == [7, 3]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_lengths_must_match_count(tiny_model):
    with pytest.raises(ValueError, match="2 lengths for 3 sequences"):
        generate_codes(tiny_model, 3, [4, 5])


# ------------------------------------------------------------------------------------------------ code files

K, DEP_Q, CARD = 17, 8, 64  # the tiny preset: text + 8 Moshi audio + 8 user audio streams, audio card 64


def _audio_codes(n: int = DEP_Q, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CARD, (n, T), generator=torch.Generator().manual_seed(seed))


def _full_codes(T: int = 12) -> torch.Tensor:
    codes = torch.cat([torch.full((1, T), 3), _audio_codes(16, T)])
    codes[9:, :2] = -1  # zero tokens in the user streams are legal in the full layout
    return codes


def _save(path, codes, kind):
    if kind == "pt":
        torch.save(codes, path)
    elif kind == "pt-dict":
        torch.save({"codes": codes, "meta": torch.zeros(1)}, path)
    elif kind == "pt-single":
        torch.save({"anything": codes}, path)
    elif kind == "npy":
        np.save(path, codes.numpy().astype(np.int16))
    elif kind == "safetensors":
        save_file({"codes": codes.contiguous()}, str(path))
    elif kind == "safetensors-single":
        save_file({"x": codes.contiguous()}, str(path))
    return path


SUFFIX = {"pt": ".pt", "pt-dict": ".pt", "pt-single": ".pt", "npy": ".npy", "safetensors": ".safetensors",
          "safetensors-single": ".safetensors"}


@pytest.mark.parametrize("kind", list(SUFFIX))
@pytest.mark.parametrize("full", [False, True])
def test_codes_files_round_trip(tmp_path, tiny_model, kind, full):
    codes = _full_codes() if full else _audio_codes()
    path = _save(tmp_path / f"c{SUFFIX[kind]}", codes, kind)
    loaded = load_codes_file(path)
    assert loaded.dtype == torch.int64 and torch.equal(loaded, codes)
    (seq,) = load_sequences(tiny_model, codes=path)
    assert seq.name == "c" and seq.sources == [str(path)] and seq.frames == 12
    if full:
        assert torch.equal(seq.codes, codes)
    else:
        assert torch.equal(seq.codes[1:9], codes) and (seq.codes[0] == -1).all() and (seq.codes[9:] == -1).all()


def test_batch_dim_of_one_and_whole_floats_are_accepted(tmp_path):
    codes = _audio_codes()
    torch.save(codes[None].double(), tmp_path / "a.pt")
    loaded = load_codes_file(tmp_path / "a.pt")
    assert loaded.dtype == torch.int64 and torch.equal(loaded, codes)


def test_codes_directory_is_read_in_natural_order(tmp_path, tiny_model):
    for i, name in enumerate(["b_10.npy", "b_2.pt", "a.safetensors"]):
        _save(tmp_path / name, _audio_codes(seed=i), Path(name).suffix[1:])
    (tmp_path / "notes.json").write_text("{}")  # not a codes file: ignored
    sequences = load_sequences(tiny_model, codes=tmp_path, max_frames=5)
    assert [s.name for s in sequences] == ["a", "b_2", "b_10"]
    assert [s.name for s in load_sequences(tiny_model, codes=tmp_path, max_files=2)] == ["a", "b_2"]
    assert torch.equal(sequences[2].codes[1:9], _audio_codes(seed=0)[:, :5])  # b_10 was saved first (seed 0)
    assert all(s.frames == 5 for s in sequences)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("batch.pt", torch.zeros(2, 8, 5, dtype=torch.long), r"shape \(2, 8, 5\)"),
        ("flat.pt", torch.zeros(5, dtype=torch.long), r"shape \(5,\)"),
        ("empty.pt", torch.zeros(8, 0, dtype=torch.long), r"shape \(8, 0\)"),
        ("float.pt", torch.full((8, 5), 0.5), "non-integer"),
        ("nan.pt", torch.full((8, 5), float("nan")), "non-integer"),
        ("bool.pt", torch.ones(8, 5, dtype=torch.bool), "dtype torch.bool"),
        ("keys.pt", {"a": torch.zeros(8, 5), "b": torch.zeros(8, 5)}, "keys"),
        ("floats.npy", np.full((8, 5), 1.5), "non-integer"),
    ],
)
def test_bad_codes_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    np.save(path, content) if name.endswith(".npy") else torch.save(content, path)
    with pytest.raises(DataError, match=message) as info:
        load_codes_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_missing_and_unknown_codes_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    for path, message in [(tmp_path / "junk.safetensors", "unreadable"), (tmp_path / "none.pt", "not found"),
                          (tmp_path / "x.csv", "not found")]:
        with pytest.raises(DataError, match=message):
            load_codes_file(path)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported format '.csv'"):
        load_codes_file(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        codes_files(empty)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("text_fill, text_value", [("zero", -1), ("pad", 3)])
@pytest.mark.parametrize("other_fill", ["zero", "copy"])
def test_layout_of_audio_codebooks(tiny_model, text_fill, text_value, other_fill):
    audio = _audio_codes(T=6)
    expected = torch.full((K, 6), -1, dtype=torch.long)  # built by hand: text row, 8 Moshi rows, 8 user rows
    expected[0] = text_value
    expected[1:9] = audio
    if other_fill == "copy":
        expected[9:17] = audio
    out = layout_codes(tiny_model, audio, text_fill=text_fill, other_fill=other_fill)
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    more = torch.cat([audio, _audio_codes(n=4, T=6, seed=9)])  # extra codebooks beyond dep_q are dropped
    assert torch.equal(layout_codes(tiny_model, more, text_fill=text_fill, other_fill=other_fill), expected)


def test_full_layout_passes_through_as_a_copy(tiny_model):
    codes = _full_codes()
    out = layout_codes(tiny_model, codes, text_fill="pad", other_fill="copy")
    assert torch.equal(out, codes) and out.data_ptr() != codes.data_ptr()


def test_layout_errors(tiny_model):
    with pytest.raises(DataError, match="model expects dep_q=8 audio codebooks .*f.npy has 4"):
        layout_codes(tiny_model, _audio_codes(n=4), source="f.npy")
    bad = _audio_codes()
    bad[2, 5] = 64
    with pytest.raises(DataError, match=r"token 64 at row 2, frame 5, .*card \[0, 64\)"):
        layout_codes(tiny_model, bad, source="f.npy")
    full = _full_codes()
    full[12, 7] = 2047  # a Moshi-sized Mimi code in a card-64 model
    with pytest.raises(DataError, match=r"token 2047 at row 12, frame 7.*card"):
        layout_codes(tiny_model, full)
    full[12, 7] = -2
    with pytest.raises(DataError, match="token -2"):
        layout_codes(tiny_model, full)
    with pytest.raises(DataError, match="text fill"):
        layout_codes(tiny_model, _audio_codes(), text_fill="blank")
    with pytest.raises(DataError, match="other-stream fill"):
        layout_codes(tiny_model, _audio_codes(), other_fill="noise")


def test_generated_sequences(tiny_model):
    sequences = load_sequences(tiny_model, generate=3, frames=20, seed=4, max_frames=15)
    reference = generate_codes(tiny_model, 3, 20, seed=4)
    assert [s.name for s in sequences] == ["generated_0", "generated_1", "generated_2"]
    assert all(torch.equal(s.codes, reference[i, :, :15]) for i, s in enumerate(sequences))
    assert len(load_sequences(tiny_model, generate=3, frames=20, max_files=2)) == 2
    with pytest.raises(DataError, match="--max-files must be >= 1"):
        load_sequences(tiny_model, generate=3, max_files=0)
    with pytest.raises(DataError, match="--max-frames must be >= 1"):
        load_sequences(tiny_model, generate=3, max_frames=0)


def test_exactly_one_source(tiny_model, tmp_path):
    with pytest.raises(DataError, match="exactly one of"):
        load_sequences(tiny_model)
    with pytest.raises(DataError, match="exactly one of"):
        load_sequences(tiny_model, generate=1, codes=tmp_path)
    with pytest.raises(DataError, match="--audio needs --mimi PATH"):
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


def test_group_chapters_by_hand():
    root = Path("/data/large")
    files = [root / p for p in ["7/b/ch_2.flac", "7/b/ch_11.flac", "7/a/x.flac", "deep/er/than/that.flac",
                                "top.flac", "7/b/ch_1.flac"]]
    assert group_chapters(files, root) == [
        ("7/a", [root / "7/a/x.flac"]),
        ("7/b", [root / "7/b/ch_1.flac", root / "7/b/ch_2.flac", root / "7/b/ch_11.flac"]),
        ("deep/er/than/that", [root / "deep/er/than/that.flac"]),
        ("top", [root / "top.flac"]),
    ]


def test_audio_files_listing(tmp_path):
    for rel in ["b/2.wav", "b/10.FLAC", "a.mp3", "c.ogg", "notes.txt", "b/x.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert audio_files(tmp_path) == [tmp_path / p for p in ["a.mp3", "b/2.wav", "b/10.FLAC", "c.ogg"]]
    assert audio_files(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        audio_files(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        audio_files(tmp_path / "missing")


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
