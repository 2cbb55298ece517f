"""Prompt files: I2P columns, subsets, limits, stable row numbering, and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from erasure.prompts import PromptFileError, default_i2p_file, read_prompts

I2P = default_i2p_file()
HEADER = "prompt,categories,evaluation_seed,evaluation_guidance\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.skipif(not I2P.is_file(), reason="shared I2P prompts not present")
def test_i2p_sexual_subset_keeps_file_seeds_and_guidance() -> None:
    everything = read_prompts(I2P)
    sexual = read_prompts(I2P, subset="sexual")
    assert len(everything) == 4703 and len(sexual) == 931
    first = sexual[0]
    assert "sexual" in first.categories
    assert (first.seed, first.guidance) == (everything[first.row].seed, everything[first.row].guidance)
    assert read_prompts(I2P, subset="sexual", limit=5) == sexual[:5]
    assert any(p.text == "" for p in everything)  # I2P has an empty prompt; it stays part of the protocol


def test_csv_defaults_bom_and_file_names(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffcase_number,prompt,evaluation_seed\n0,a church,42\n1,a dog,\n".encode("utf-8"))
    prompts = read_prompts(path, seed=100, guidance=5.0)
    assert [(p.text, p.seed, p.guidance) for p in prompts] == [("a church", 42, 5.0), ("a dog", 101, 5.0)]
    assert [p.file for p in prompts] == ["00000.png", "00001.png"]


def test_subset_and_limit_do_not_renumber_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", HEADER + 'a,"violence, sexual",1,7\nb,hate,2,7\nc,Sexual,3,9.5\n')
    chosen = read_prompts(path, subset="sexual")
    assert [(p.row, p.text, p.seed, p.guidance) for p in chosen] == [(0, "a", 1, 7.0), (2, "c", 3, 9.5)]
    assert [p.row for p in read_prompts(path, subset="sexual", limit=1)] == [0]


def test_txt_skips_blank_lines_and_numbers_seeds(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "a cat\n\n  a dog  \n")
    assert [(p.row, p.text, p.seed) for p in read_prompts(path, seed=10)] == [(0, "a cat", 10), (1, "a dog", 11)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.csv", "", "is empty"),
        ("header.csv", HEADER, "holds no prompts"),
        ("blank.txt", "\n\n", "holds no prompts"),
        ("nocol.csv", "text,seed\nhello,1\n", "no 'prompt' column .*columns: text, seed"),
        ("badseed.csv", HEADER + "a,sexual,abc,7\n", "data row 0: column 'evaluation_seed'"),
        ("negseed.csv", HEADER + "a,sexual,-3,7\n", "non-negative integer"),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(PromptFileError, match=message):
        read_prompts(write(tmp_path / name, text))


def test_missing_file_and_bad_subsets(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.csv")
    with pytest.raises(PromptFileError, match="needs a 'categories' column"):
        read_prompts(write(tmp_path / "p.txt", "a\n"), subset="sexual")
    with pytest.raises(PromptFileError, match="choose one of: hate, sexual"):
        read_prompts(write(tmp_path / "p.csv", HEADER + "a,sexual,1,7\nb,hate,2,7\n"), subset="violence")
