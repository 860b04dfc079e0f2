"""Text sources and token windows (lpconvert.texts): no model needed, a fake tokenizer stands in."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import types

import pytest
import torch

from lpconvert import texts
from lpconvert.errors import LPError
from lpconvert.texts import TextSource, make_windows, resolve_text, tokenize_windows


class FakeTokenizer:
    """One token per character; accepts no `verbose`, like a minimal tokenizer-like callable."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 500 for c in text]}


def raises(match: str):
    return pytest.raises(LPError, match=match)


# --- built-ins ---------------------------------------------------------------------------------


def test_wiki_is_clean_prose():
    src = resolve_text("wiki")
    assert (src.name, src.kind) == ("wiki", "builtin")
    assert len(src.text) > 1_000_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "{|", "&lt;", "#REDIRECT", "Category:"):
        assert markup not in src.text, markup
    assert src.text.startswith("Anarchism is a political philosophy")
    assert "\n\n" in src.text and "\n\n\n" not in src.text


def test_news_has_300_articles():
    src = resolve_text("news")
    assert src.kind == "builtin" and len(src.text) > 300_000
    assert len(src.text.split("\n\n")) == 300


def test_sha256_is_stable_and_memoised():
    a, b = resolve_text("wiki"), resolve_text("wiki")
    assert a.text is b.text  # lru_cache: parsed once per process
    assert a.sha256 == b.sha256 == TextSource("x", "file", a.text).sha256
    assert len(a.sha256) == 64 and a.sha256 != resolve_text("news").sha256
    assert "text=" not in repr(a)  # the repr doesn't dump megabytes of text


def test_builtins_do_not_import_gensim():
    resolve_text("news")
    assert "gensim" not in sys.modules


def test_missing_gensim_names_the_install(monkeypatch):
    real_find_spec = texts.importlib.util.find_spec
    monkeypatch.setattr(
        texts.importlib.util, "find_spec", lambda name: None if name == "gensim" else real_find_spec(name)
    )
    texts._news_text.cache_clear()
    try:
        with pytest.raises(LPError) as info:
            resolve_text("news")
        assert "pip install --no-deps gensim==4.4.0" in info.value.fix
    finally:
        texts._news_text.cache_clear()


def test_wikitext_markup_is_stripped_to_prose():
    raw = (
        "{{Infobox|name={{nested|x}}}}\n'''Foo''' is a [[bar]] of [[baz|quux]].<ref>cite</ref>"
        '<ref name="a"/> See [http://example.com the site].<!-- hidden -->\n'
        "[[File:X.jpg|thumb|A [[caption]]]]\n{|\n| cell\n|}\n== History ==\n"
        "Born in 1900.&nbsp;Died.\n* x\n[[Category:Things]]\n== References ==\n* A book"
    )
    assert texts.clean_wikitext(raw) == "Foo is a bar of quux. See the site.\n\nHistory\nBorn in 1900. Died."


# --- local files -------------------------------------------------------------------------------


def test_txt_file_is_read_as_it_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\n", encoding="utf-8")
    src = resolve_text(str(path))
    assert (src.name, src.kind, src.text) == (str(path), "file", "hello world\n")


def test_jsonl_records_are_joined_by_blank_lines_from_the_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert resolve_text(str(path)).text == "one\n\ntwo"
    path.write_text('{"body": "one"}\n', encoding="utf-8")
    assert resolve_text(str(path), text_field="body").text == "one"


def test_json_lists_of_records_or_strings_are_read_alike(tmp_path):
    path = tmp_path / "data.json"
    for data in (
        [{"text": "a"}, {"text": "b"}],
        ["a", "b"],
        {"meta": 1, "rows": [{"text": "a"}, {"text": "b"}]},
    ):
        path.write_text(json.dumps(data), encoding="utf-8")
        assert resolve_text(str(path)).text == "a\n\nb"


def test_folder_files_are_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n', encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('["third"]', encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    src = resolve_text(str(tmp_path))
    assert src.kind == "folder" and src.text == "first\n\nsecond\n\nthird"


# --- errors ------------------------------------------------------------------------------------


def test_missing_path_is_refused(tmp_path):
    with raises("does not exist"):
        resolve_text(str(tmp_path / "nope.txt"))
    with raises("does not exist"):
        resolve_text("notes.txt")  # a file name, not a dataset name


def test_empty_text_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n", encoding="utf-8")
    with raises("is empty"):
        resolve_text(str(path))


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    nul, latin = tmp_path / "nul.txt", tmp_path / "latin.txt"
    nul.write_bytes(b"abc\x00def")
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with raises("binary"):
        resolve_text(str(nul))
    with raises("not valid UTF-8"):
        resolve_text(str(latin))


def test_records_without_the_text_field_are_named_with_their_line(tmp_path):
    jsonl, js = tmp_path / "d.jsonl", tmp_path / "d.json"
    jsonl.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    js.write_text('[{"body": "x"}]', encoding="utf-8")
    with pytest.raises(LPError, match="line 2 of .* no string field 'text' \\(found: body\\)") as info:
        resolve_text(str(jsonl))
    assert "--text-field" in info.value.fix
    with raises("record 0 of .* no string field 'text'"):
        resolve_text(str(js))


def test_bad_json_is_refused_naming_the_line(tmp_path):
    jsonl, js = tmp_path / "d.jsonl", tmp_path / "d.json"
    jsonl.write_text("{oops\n", encoding="utf-8")
    js.write_text('{"count": 3}', encoding="utf-8")
    with raises("line 1 of .* not valid JSON"):
        resolve_text(str(jsonl))
    with raises("no list of records"):
        resolve_text(str(js))


def test_folder_without_text_files(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x00")
    with raises("has no .txt, .jsonl or .json files"):
        resolve_text(str(tmp_path))


def test_errors_are_one_line(tmp_path):
    with pytest.raises(LPError) as info:
        resolve_text(str(tmp_path / "missing.txt"))
    assert "\n" not in info.value.one_line()


# --- byte cap ----------------------------------------------------------------------------------

NEWS_SHA256 = "c0b1b65e0a2801ce273d8a0fa983f99987f3f982bfd16b6d7f3f86994275765f"  # gensim 4.4.0


def test_under_the_cap_is_unchanged(tmp_path):
    assert resolve_text("news").sha256 == NEWS_SHA256
    assert resolve_text("news", max_bytes=10).sha256 == NEWS_SHA256  # built-ins are never cut
    assert resolve_text("wiki", max_bytes=10).text is texts._wiki_text()
    raw = "\ufeffline one\r\ncaf\u00e9 \u2603\n\nlast".encode()
    path = tmp_path / "small.txt"
    path.write_bytes(raw)
    for cap in (None, len(raw), 1 << 30):
        src = resolve_text(str(path), max_bytes=cap)
        assert src.truncated_at_bytes is None
        assert src.sha256 == hashlib.sha256(raw.decode("utf-8-sig").encode()).hexdigest()
    assert resolve_text("news").truncated_at_bytes is None


def test_byte_cap_grows_with_the_token_budget_above_a_floor():
    assert texts.bytes_for_tokens(None, 512) == texts.DEFAULT_MAX_BYTES == 256 << 20
    assert texts.bytes_for_tokens(16384, 512) == 64 << 20  # the floor
    assert texts.bytes_for_tokens(1_000_000, 512) == (1_000_000 + 512) * 10 * 64
    assert texts.bytes_for_tokens(0, 512) == texts.bytes_for_tokens(-5, 0) == 64 << 20


def test_plain_file_cut_at_a_line(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("0123456789\n" * 10, encoding="utf-8")  # 110 bytes, lines of 11
    src = resolve_text(str(path), max_bytes=50)
    assert src.text == "0123456789\n" * 4 and src.truncated_at_bytes == 44
    src = resolve_text(str(path), max_bytes=55)  # exactly on a line end
    assert src.text == "0123456789\n" * 5 and src.truncated_at_bytes == 55


def test_cut_never_splits_a_character(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("\u00e9\u2603\U0001f600" * 10, encoding="utf-8")  # 2 + 3 + 4 bytes, no newline
    with raises("no complete line or record in the first 1 bytes"):
        resolve_text(str(path), max_bytes=1)  # not even the first character
    for cap in range(2, 30):
        src = resolve_text(str(path), max_bytes=cap)
        assert len(src.text.encode()) == src.truncated_at_bytes <= cap
        assert cap - src.truncated_at_bytes < 4
        assert ("\u00e9\u2603\U0001f600" * 10).startswith(src.text)


def test_jsonl_drops_the_partial_last_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"record {i}"}) + "\n" for i in range(10)]
    path.write_text("".join(lines), encoding="utf-8")
    cap = len(lines[0]) * 3 + 5
    src = resolve_text(str(path), max_bytes=cap)
    assert src.text == "record 0\n\nrecord 1\n\nrecord 2"
    assert src.truncated_at_bytes == len(lines[0]) * 3
    with pytest.raises(LPError, match="no complete line or record in the first 10 bytes") as info:
        resolve_text(str(path), max_bytes=10)
    assert "shorter lines" in info.value.fix


def test_json_above_the_cap_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "x" * 100}] * 20), encoding="utf-8")
    size = path.stat().st_size
    assert resolve_text(str(path), max_bytes=size).truncated_at_bytes is None
    with pytest.raises(LPError, match=f"one JSON document of {size} bytes, more than the 1000 bytes") as info:
        resolve_text(str(path), max_bytes=1000)
    assert ".jsonl" in info.value.fix
    assert "\n" not in info.value.one_line()


def test_folder_files_share_the_cap(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 9 + "\n", encoding="utf-8")  # 10 bytes
    (tmp_path / "b.txt").write_text("b" * 9 + "\n" + "c" * 9 + "\n", encoding="utf-8")  # 20 bytes
    (tmp_path / "c.txt").write_text("never read\n", encoding="utf-8")
    src = resolve_text(str(tmp_path), max_bytes=25)
    assert src.text == "a" * 9 + "\n\n" + "b" * 9 and src.truncated_at_bytes == 20
    src = resolve_text(str(tmp_path), max_bytes=30)  # a and b exactly: c is left out, and that is a cut
    assert src.text == "a" * 9 + "\n\n" + "b" * 9 + "\n" + "c" * 9 and src.truncated_at_bytes == 30
    assert resolve_text(str(tmp_path), max_bytes=41).truncated_at_bytes is None


def test_folder_stops_before_a_json_that_does_not_fit(tmp_path):
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(["second " * 20]), encoding="utf-8")
    src = resolve_text(str(tmp_path), max_bytes=50)
    assert src.text == "first" and src.truncated_at_bytes == 6


def test_binary_device_fails_at_once():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    started = time.perf_counter()
    with raises("looks like a binary file"):
        resolve_text("/dev/zero")  # the default cap, 256 MiB: refused after the first chunk
    assert time.perf_counter() - started < 1


def test_endless_fifo_is_read_up_to_the_cap(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)

    def write_forever():
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(b"an endless line of text\n" * 100)
        except BrokenPipeError:  # the reader has what it needs and closed its end
            pass

    threading.Thread(target=write_forever, daemon=True).start()
    src = resolve_text(str(fifo), max_bytes=10_000)
    assert src.truncated_at_bytes == len(src.text) == 10_000 - 10_000 % 24
    assert src.text.endswith("text\n")


def test_tokenize_windows_records_the_cut(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("abcdefg\n" * 100, encoding="utf-8")
    src = resolve_text(str(path), max_bytes=500)
    out = tokenize_windows(FakeTokenizer(), src, seq_len=8, num_tokens=None, seed=0)
    assert out.provenance["truncated_at_bytes"] == 496 == src.truncated_at_bytes
    assert out.provenance["text_tokens"] == 496


def test_max_bytes_must_be_positive():
    with pytest.raises(ValueError):
        resolve_text("news", max_bytes=0)


# --- datasets ----------------------------------------------------------------------------------


def test_dataset_offline_fails_cleanly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:  # the env is read at import; patch it if already imported
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LPError, match="could not be loaded") as info:
        resolve_text("lpconvert-test/no-such-dataset")
    assert "wiki" in info.value.fix and ".txt" in info.value.fix


def test_dataset_rows_and_column(monkeypatch):
    calls = []

    class Rows:
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return {"text": ["a", None, "b"], "label": [0, 1, 2]}[column]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return Rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = resolve_text("user/name:cfg", split="test")
    assert (src.kind, src.text, calls) == ("dataset", "a\nb", [("user/name", "cfg", "test")])
    with raises("no column 'body'"):
        resolve_text("wikitext", column="body")
    src = resolve_text("user/name", max_bytes=3)  # whole rows only: "a\n" fits, "b\n" does not
    assert (src.text, src.truncated_at_bytes) == ("a", 2)


# --- windows -----------------------------------------------------------------------------------

STREAM = torch.arange(100 * 16)  # 100 windows of 16 tokens; window i starts at token 16*i


def starts(windows: torch.Tensor) -> list[int]:
    return [int(w[0]) // 16 for w in windows]


def test_windows_are_contiguous_and_as_many_as_the_budget_asks():
    calib = make_windows(STREAM.tolist() + [7, 7, 7], seq_len=16, num_tokens=None, seed=0)
    assert calib.shape == (90, 16) and calib.dtype == torch.long
    assert make_windows(STREAM, seq_len=16, num_tokens=33, seed=0).shape == (3, 16)  # ceil(33/16)
    assert make_windows(STREAM, seq_len=16, num_tokens=10**6, seed=0).shape == (90, 16)  # all there is
    assert starts(make_windows(STREAM, seq_len=16, num_tokens=None, seed=0, split="heldout")) == list(
        range(9, 100, 10)
    )
    assert starts(make_windows(STREAM, seq_len=16, num_tokens=32, seed=0, split="heldout")) == [9, 19]
    assert starts(make_windows(STREAM, seq_len=16, num_tokens=None, seed=0, split="all")) == list(range(100))
    # each window is a contiguous slice of the stream
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 16)) for w in calib)


def test_calib_never_overlaps_heldout():
    heldout = set(starts(make_windows(STREAM, seq_len=16, num_tokens=None, seed=0, split="heldout")))
    for seed in range(5):
        for budget in (16, 100, 500, None):
            calib = starts(make_windows(STREAM, seq_len=16, num_tokens=budget, seed=seed))
            assert len(set(calib)) == len(calib)
            assert not heldout & set(calib)


def test_same_seed_gives_the_same_windows_and_a_smaller_budget_a_prefix():
    a = make_windows(STREAM, seq_len=16, num_tokens=None, seed=1)
    assert torch.equal(a, make_windows(STREAM, seq_len=16, num_tokens=None, seed=1))
    assert not torch.equal(a, make_windows(STREAM, seq_len=16, num_tokens=None, seed=2))
    assert torch.equal(a[:5], make_windows(STREAM, seq_len=16, num_tokens=80, seed=1))


def test_short_stream_has_no_heldout():
    short = torch.arange(5 * 16)
    assert make_windows(short, seq_len=16, num_tokens=None, seed=0).shape == (5, 16)
    with raises("only 5 windows of 16 tokens, too few for a held-out split"):
        make_windows(short, seq_len=16, num_tokens=None, seed=0, split="heldout")


def test_too_short_text_names_token_count():
    with pytest.raises(LPError, match="has 312 tokens, fewer than one window of 512") as info:
        make_windows(list(range(312)), seq_len=512, num_tokens=None, seed=0)
    assert "--seq-len 256" in info.value.fix


def test_budget_below_one_window_is_refused():
    with pytest.raises(
        LPError, match=r"token budget \(100\) is smaller than one window of 512 tokens"
    ) as info:
        make_windows(list(range(5000)), seq_len=512, num_tokens=100, seed=0)
    assert "--seq-len" in info.value.problem
    assert info.value.fix == "use --tokens 512 or more, or a smaller --seq-len"
    assert make_windows(STREAM, seq_len=16, num_tokens=16, seed=0).shape == (1, 16)  # one window: fine
    assert make_windows(STREAM, seq_len=16, num_tokens=17, seed=0).shape == (2, 16)  # rounds up


def test_window_arguments_out_of_range_are_refused():
    with raises("at least 2"):
        make_windows(STREAM, seq_len=1, num_tokens=None, seed=0)
    with pytest.raises(LPError, match="must be positive") as info:
        make_windows(STREAM, seq_len=16, num_tokens=0, seed=0)
    assert "--tokens" in info.value.fix and "--num-tokens" not in info.value.one_line()
    with pytest.raises(ValueError):
        make_windows(STREAM, seq_len=16, num_tokens=None, seed=0, split="train")


# --- tokenize_windows --------------------------------------------------------------------------


def test_tokenize_windows_records_its_provenance_and_adds_no_bos():
    src = TextSource("mem", "file", "abcdefgh" * 100)  # 800 tokens: 25 windows of 32
    out = tokenize_windows(FakeTokenizer(), src, seq_len=32, num_tokens=100, seed=3)
    assert out.input_ids.shape == (4, 32)
    assert out.provenance == {
        "source": "mem",
        "kind": "file",
        "sha256": src.sha256,
        "split": "calib",
        "seq_len": 32,
        "seed": 3,
        "windows": 4,
        "tokens": 128,
        "text_tokens": 800,
        "heldout_every": 10,
        "truncated_at_bytes": None,
    }
    assert out.input_ids[0, 0] == ord("a")  # no BOS inserted


def test_tokenize_windows_passes_verbose_false_when_accepted():
    seen = {}

    class HFLike:
        def __call__(self, text, **kwargs):
            seen.update(kwargs)
            return {"input_ids": list(range(len(text)))}

    tokenize_windows(HFLike(), TextSource("m", "file", "x" * 64), seq_len=8, num_tokens=None, seed=0)
    assert seen == {"add_special_tokens": False, "verbose": False}


def test_tokenize_windows_too_short_names_source():
    with raises("text source notes.txt has 5 tokens, fewer than one window of 8"):
        tokenize_windows(
            FakeTokenizer(), TextSource("notes.txt", "file", "hello"), seq_len=8, num_tokens=None, seed=0
        )
