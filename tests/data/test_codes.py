"""data/codes.py: random codes, and codes files read in every format or refused with the file named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from codes_fixtures import SUFFIX, audio_codes, full_codes, save_codes

from fused_stream.data.codes import codes_files, generate_codes, load_codes_file
from fused_stream.data.dataset import load_dataset, load_sequences
from fused_stream.errors import DataError


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


@pytest.mark.parametrize("kind", list(SUFFIX))
@pytest.mark.parametrize("full", [False, True])
def test_codes_files_round_trip(tmp_path, tiny_model, kind, full):
    codes = full_codes() if full else audio_codes()
    path = save_codes(tmp_path / f"c{SUFFIX[kind]}", codes, kind)
    loaded = load_codes_file(path)
    assert loaded.dtype == torch.int64 and torch.equal(loaded, codes)
    (seq,) = load_sequences(tiny_model, codes=path)
    assert seq.name == "c" and seq.sources == [str(path)] and seq.frames == codes.shape[1]
    if full:
        assert torch.equal(seq.codes, codes)
    else:
        assert torch.equal(seq.codes[1:9], codes) and (seq.codes[0] == -1).all() and (seq.codes[9:] == -1).all()


def test_batch_dim_of_one_and_whole_floats_are_accepted(tmp_path):
    codes = audio_codes()
    torch.save(codes[None].double(), tmp_path / "a.pt")
    loaded = load_codes_file(tmp_path / "a.pt")
    assert loaded.dtype == torch.int64 and torch.equal(loaded, codes)


def test_codes_directory_is_read_in_natural_order(tmp_path, tiny_model):
    for i, name in enumerate(["b_10.npy", "b_2.pt", "a.safetensors"]):
        save_codes(tmp_path / name, audio_codes(seed=i), Path(name).suffix[1:])
    (tmp_path / "notes.json").write_text("{}")  # not a codes file: ignored
    sequences = load_sequences(tiny_model, codes=tmp_path, max_frames=5)
    assert [s.name for s in sequences] == ["a", "b_2", "b_10"]
    assert [s.name for s in load_sequences(tiny_model, codes=tmp_path, max_files=2)] == ["a", "b_2"]
    assert torch.equal(sequences[2].codes[1:9], audio_codes(seed=0)[:, :5])  # b_10 was saved first (seed 0)
    assert all(s.frames == 5 for s in sequences)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("batch.pt", torch.zeros(2, 8, 5, dtype=torch.long), r"shape \(2, 8, 5\)"),
        ("flat.pt", torch.zeros(5, dtype=torch.long), r"shape \(5,\)"),
        ("empty.pt", torch.zeros(8, 0, dtype=torch.long), r"shape \(8, 0\)"),
        ("float.pt", torch.full((8, 5), 0.5), "non-integer"),
        ("nan.pt", torch.full((8, 5), float("nan")), "non-finite"),
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


def test_codes_file_values_are_named_by_row_and_frame(tmp_path):
    """The same rules as the API (`layout_codes`): non-finite and fractional values named where they are."""
    codes = audio_codes(T=20).numpy().astype(np.float32)
    codes[2, 5] = np.nan
    np.save(tmp_path / "nan.npy", codes)
    codes[2, 5] = 7.25
    torch.save(torch.from_numpy(codes), tmp_path / "frac.pt")
    half = np.zeros((8, 20), np.float16)
    half[1, 3] = 4101  # stored as 4100: any code above 2048 may have been rounded when it was written as float16
    np.save(tmp_path / "half.npy", half)
    for name, message in [("nan.npy", "a non-finite value nan at row 2, frame 5"),
                          ("frac.pt", r"a non-integer value 7\.25 at row 2, frame 5"),
                          ("half.npy", r"beyond 2048, where torch.float16 stops holding every integer exactly "
                                       r"\(rounded codes\?\), the value 4100\.0 at row 1, frame 3")]:
        with pytest.raises(DataError, match=rf"^codes file {tmp_path / name} holds {message}: codes must be integers$"):
            load_codes_file(tmp_path / name)


def test_transposed_codes_file_is_refused_and_collected(tmp_path, tiny_model):
    save_codes(tmp_path / "a.pt", audio_codes(T=40), "pt")
    save_codes(tmp_path / "b.pt", audio_codes(T=300).T.contiguous(), "pt")  # [300, 8]
    save_codes(tmp_path / "c.npy", audio_codes(T=20).T.contiguous(), "npy")  # [20, 8]: 20 rows <= 32, > 8 frames
    with pytest.raises(DataError, match=r"b\.pt has shape \(300, 8\): 300 rows.*transposed\?"):
        load_sequences(tiny_model, codes=tmp_path)
    data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    assert [s.name for s in data.sequences] == ["a"]
    assert [f["name"] for f in data.failed] == ["b", "c"] and all("transposed?" in f["reason"] for f in data.failed)


@pytest.mark.parametrize("frames", [1, 8])
def test_a_square_codes_file_is_refused_like_a_short_one(tmp_path, tiny_model, frames):
    """[8, 8] reads the same either way round, as [8, 1] cannot be told from a transposed file: one rule refuses
    both (rows >= frames); [8, 9] is read."""
    save_codes(tmp_path / "a.pt", audio_codes(T=frames), "pt")
    save_codes(tmp_path / "ok.pt", audio_codes(T=9), "pt")
    data = load_dataset(tiny_model, codes=tmp_path, on_error="collect")
    assert [s.name for s in data.sequences] == ["ok"] and [f["name"] for f in data.failed] == ["a"]
    reason = data.failed[0]["reason"]
    assert f"shape (8, {frames}): more rows (codebooks) than frames, or as many" in reason and "transposed?" in reason


def test_codes_sub_directories_are_listed_not_read(tmp_path, caplog):
    """Not recursive (an output folder inside must never be data), but never silent: a warning names them."""
    root, elsewhere = tmp_path / "codes", tmp_path / "elsewhere"
    for directory in (root / "real_sub", elsewhere):
        directory.mkdir(parents=True)
    save_codes(root / "top.pt", audio_codes(), "pt")
    save_codes(root / "real_sub" / "x.pt", audio_codes(), "pt")
    save_codes(elsewhere / "y.npy", audio_codes(), "npy")
    (root / "linked_sub").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # must not hang
    with caplog.at_level("WARNING"):
        assert codes_files(root) == [root / "top.pt"]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "2 codes files in sub-directories are NOT read" in message and "linked_sub, real_sub" in message
    (root / "top.pt").unlink()
    with pytest.raises(DataError, match="holds no .* files \\(only in its sub-directories linked_sub, real_sub\\)"):
        codes_files(root)
