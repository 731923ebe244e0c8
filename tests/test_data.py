"""Real text: markdown stripping, default corpus, deterministic held-out windows, bad files."""

import pytest

from packkv import data


class CharTokenizer:
    """One token a character: fast and exact, enough to test window selection."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_strip_markdown():
    md = "# Hamlet\n\n### SCENE I.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n_\\[Aside]_ snake_case\n\n\n\nEnd"
    assert data.strip_markdown(md) == "Hamlet\n\nSCENE I.\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n[Aside] snake_case\n\nEnd\n"


def test_default_text_is_plain_shakespeare():
    text = data.load_text()
    assert len(text) > 4_000_000
    assert "To be, or not to be" in text
    assert "**" not in text and "\\[" not in text and "\n#" not in text


def test_windows_deterministic_and_held_out():
    text = "".join(f"line {i} of the text\n" for i in range(5000))
    tok = CharTokenizer()
    a = data.token_windows(text, tok, 4, 100, "eval")
    assert a.shape == (4, 100)
    assert a.equal(data.token_windows(text, tok, 4, 100, "eval"))
    tune = data.token_windows(text, tok, 4, 100, "tune")
    rows = {tuple(r.tolist()) for r in a}
    assert not rows & {tuple(r.tolist()) for r in tune}
    # Windows start at a line start.
    assert all(chr(r[0]) == "l" for r in a)


def test_windows_reject_bad_arguments():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="split"):
        data.token_windows("x" * 1000, tok, 2, 10, "train")
    with pytest.raises(ValueError, match="too short"):
        data.token_windows("x" * 100, tok, 4, 100)


def test_user_file(tmp_path):
    p = tmp_path / "t.md"
    p.write_text("**A**  \nline\n", encoding="utf-8")
    assert data.load_text(p) == "A\nline\n"
    q = tmp_path / "t.txt"
    q.write_text("**kept**\n", encoding="utf-8")
    assert data.load_text(q) == "**kept**\n"


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00bad", b"  \n"])
def test_bad_file_is_a_clear_error(tmp_path, content):
    p = tmp_path / "t.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ValueError, match="t.txt"):
        data.load_text(p)
