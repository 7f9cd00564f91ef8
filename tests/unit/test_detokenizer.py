"""Incremental detokenization and stop strings, on real tokenizers trained in-memory."""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cluster.detokenizer import IncrementalDetokenizer, StopStringMatcher, StreamingText

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "Café, naïve, façade, résumé, jalapeño, Übermäßig, smørrebrød, Ångström.",
    "我们今天去北京。中文的字符很多，机器学习很有意思。日本語のテキストも少し。",
    "한국어 문장도 있습니다. Привет, как дела? Γειά σου κόσμε.",
    "Emoji time 😀😃🎉🚀 and flags 🇫🇷🇯🇵 and family 👨‍👩‍👧 ok 👍🏽.",
    "def main():\n    print('hello')\n\ndef other():\n    return 42\n",
]
SPECIALS = ["<s>", "</s>"]
HYPOTHESIS = settings(max_examples=100, deadline=None)

# Text drawn from the corpus's characters (so merges fire) and from anywhere in Unicode; U+FFFD and surrogates
# are left out so that valid input must never produce a replacement character.
_corpus_chars = st.sampled_from(sorted(set("".join(CORPUS))))
_any_char = st.characters(codec="utf-8", exclude_characters="\ufffd")
TEXTS = st.text(st.one_of(_corpus_chars, _corpus_chars, _any_char), max_size=40)
CHUNKS = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=8)


@functools.cache
def byte_level_bpe() -> Tokenizer:
    """GPT-2-style byte-level BPE: frequent CJK characters merge into one token, rarer ones and emoji do not."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


@functools.cache
def raw_bytes() -> Tokenizer:
    """One token per byte: every multi-byte character spans tokens."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


@functools.cache
def sentencepiece_like() -> Tokenizer:
    """Mistral-style: "▁" word marks, <0xXX> byte fallback for characters outside a small alphabet, and a
    decoder that strips the leading space of the text it decodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "▁\n éïçñü中文的我们"))
    trainer = trainers.BpeTrainer(  # exactly this alphabet (a frequency cut would break ties at random)
        vocab_size=300,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "byte_level_bpe": byte_level_bpe,
    "raw_bytes": raw_bytes,
    "sentencepiece_like": sentencepiece_like,
}


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = sizes[len(chunks) % len(sizes)]
        chunks.append(ids[i : i + n])
        i += n
    return chunks


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.add(chunk) for chunk in chunks] + [detok.finish()]


def _assert_clean(deltas: list[str]) -> None:
    for delta in deltas:
        assert "\ufffd" not in delta, f"delta {delta!r} of {deltas!r} holds a replacement character"
        delta.encode("utf-8")  # no lone surrogates


# --- the tokenizers really split characters ---------------------------------------------------------------------


def test_fixtures_split_characters_across_tokens():
    bpe, raw, sp = byte_level_bpe(), raw_bytes(), sentencepiece_like()
    assert len(_encode(bpe, "中")) == 1 and len(_encode(bpe, "😀")) > 1 and len(_encode(bpe, "é")) > 1
    assert len(_encode(raw, "a中😀")) == len("a中😀".encode())
    assert sp.encode("😀").tokens == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    for tok in (bpe, raw, sp):
        assert tok.decode(_encode(tok, "😀")[:-1]).endswith("\ufffd")  # decode marks the incomplete character


# --- IncrementalDetokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", CORPUS)
def test_token_by_token_deltas_join_to_decode(name: str, text: str):
    tok = TOKENIZERS[name]()
    ids = _encode(tok, text)
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, [[i] for i in ids])
    _assert_clean(deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", TOKENIZERS)
@HYPOTHESIS
@given(text=TEXTS, sizes=CHUNKS)
def test_random_texts_and_chunkings(name: str, text: str, sizes: list[int]):
    tok = TOKENIZERS[name]()
    ids = _encode(tok, text)
    deltas = _stream(IncrementalDetokenizer(tok), _chunked(ids, sizes))
    _assert_clean(deltas)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    if name != "sentencepiece_like":  # byte-level decoders round-trip exactly
        assert "".join(deltas) == text


def test_incomplete_character_is_held_until_it_completes():
    tok = raw_bytes()
    e4, b8, ad = _encode(tok, "中")
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in _encode(tok, "ab")] == ["a", "b"]
    assert detok.add([e4]) == "" and detok.add([b8]) == ""
    assert detok.add([ad]) == "中"
    assert detok.add([*_encode(tok, "x"), e4]) == "x"  # a complete character is not held behind a partial one
    assert detok.text == "ab中x"


def test_finish_flushes_an_invalid_tail_as_decode_does():
    tok = raw_bytes()
    ids = _encode(tok, "a😀")[:-2]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids) == "a"
    assert detok.finish() == "\ufffd"
    assert detok.text == tok.decode(ids) == "a\ufffd"


@HYPOTHESIS
@given(ids=st.lists(st.integers(min_value=0, max_value=257), max_size=30), sizes=CHUNKS)
def test_arbitrary_byte_sequences_still_join_to_decode(ids: list[int], sizes: list[int]):
    tok = raw_bytes()  # ids 256 and 257 are the special tokens; invalid UTF-8 is common here
    assert "".join(_stream(IncrementalDetokenizer(tok), _chunked(ids, sizes))) == tok.decode(ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_tokens_are_skipped(name: str):
    tok = TOKENIZERS[name]()
    ids = [tok.token_to_id("<s>"), *_encode(tok, "Café 中文"), tok.token_to_id("</s>")]
    deltas = _stream(IncrementalDetokenizer(tok), [[i] for i in ids])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_prompt_context_keeps_the_leading_space_of_a_sentencepiece_continuation():
    tok = sentencepiece_like()
    prompt, generated = _encode(tok, "Hello"), _encode(tok, "world")
    assert tok.id_to_token(generated[0]).startswith("▁") and tok.decode(generated) == "world"
    assert "".join(_stream(IncrementalDetokenizer(tok, prompt), [[i] for i in generated])) == " world"
    assert "".join(_stream(IncrementalDetokenizer(tok), [[i] for i in generated])) == "world"


@pytest.mark.parametrize("name", TOKENIZERS)
@HYPOTHESIS
@given(prompt=TEXTS, text=TEXTS, sizes=CHUNKS)
def test_prompt_context_yields_the_continuation_text(name: str, prompt: str, text: str, sizes: list[int]):
    """With a prompt, the deltas are what the generated tokens add to the decoded prompt; for byte-level
    decoders that is exactly decode(generated). The raw-byte prompt window often opens inside a character."""
    tok = TOKENIZERS[name]()
    prompt_ids = [tok.token_to_id("<s>"), *_encode(tok, prompt)]
    ids = _encode(tok, (" " + text) if name == "sentencepiece_like" else text)
    deltas = _stream(IncrementalDetokenizer(tok, prompt_ids), _chunked(ids, sizes))
    _assert_clean(deltas)
    full, head = tok.decode(prompt_ids + ids), tok.decode(prompt_ids)
    assert full.startswith(head)
    assert "".join(deltas) == full[len(head) :]
    if name != "sentencepiece_like":
        assert "".join(deltas) == tok.decode(ids) == text


def test_prompt_ending_inside_a_character_does_not_lose_generated_text():
    tok = raw_bytes()
    ids = _encode(tok, "ab中")
    detok = IncrementalDetokenizer(tok, ids[:-1])
    assert detok.add(_encode(tok, "xyz")) == "xyz"  # the prompt's orphan bytes are not ours; nothing generated is lost


# --- StopStringMatcher ------------------------------------------------------------------------------------------


def _feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[tuple[str, bool]], str]:
    return [matcher.feed(d) for d in deltas], matcher.flush()


def test_stop_spanning_deltas_is_caught():
    matcher = StopStringMatcher(["\n\ndef"])
    steps, tail = _feed_all(matcher, ["x = 1", "\n", "\nd", "ef", " more"])
    assert steps == [("x = 1", False), ("", False), ("", False), ("", True), ("", True)]
    assert tail == "" and matcher.matched == "\n\ndef"


def test_stop_at_the_very_start():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("##") == ("", False)
    assert matcher.feed("# rest") == ("", True)
    assert StopStringMatcher(["END"]).feed("END") == ("", True)


def test_earliest_occurrence_wins_over_list_order():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("he") == ("he", False)
    assert matcher.feed("l") == ("", False)  # could start "lo w"
    assert matcher.feed("lo world") == ("l", True)  # "hel" in all
    assert matcher.matched == "lo w"


def test_the_stop_completed_first_wins_whatever_the_chunking():
    for chunks in (["\n", "a", "a"], ["\naa"]):
        matcher = StopStringMatcher(["\naa", "a"])
        steps, _ = _feed_all(matcher, chunks)
        assert "".join(s for s, _ in steps) == "\n" and matcher.matched == "a"
    matcher = StopStringMatcher(["b", "abc", "ab"])  # "ab" and "b" complete together: the longer one wins
    assert matcher.feed("xabc") == ("x", True) and matcher.matched == "ab"


def test_partial_match_that_diverges_is_released():
    matcher = StopStringMatcher(["\n\ndef"])
    steps, tail = _feed_all(matcher, ["a", "\n", "\nd", "o", "ne"])
    assert steps == [("a", False), ("", False), ("", False), ("\n\ndo", False), ("ne", False)]
    assert tail == "" and not matcher.stopped


def test_overlapping_partial_matches():
    matcher = StopStringMatcher(["abac"])
    steps, _ = _feed_all(matcher, list("ababac"))
    assert "".join(s for s, _ in steps) == "ab" and steps[-1][1]


def test_held_text_is_flushed_at_the_end():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("result </e") == ("result ", False)
    assert matcher.flush() == "</e"
    assert not matcher.stopped


def test_no_stop_strings_pass_everything():
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


@pytest.mark.parametrize("stop", [[""], ["ok", ""]])
def test_empty_stop_string_is_rejected(stop: list[str]):
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(stop)


@HYPOTHESIS
@given(
    text=st.text("ab\nc", max_size=30),
    stops=st.lists(st.text("ab\nc", min_size=1, max_size=4), max_size=3),
    sizes=CHUNKS,
)
def test_matcher_output_is_the_text_before_the_first_stop(text: str, stops: list[str], sizes: list[int]):
    ends = [n for n in range(len(text) + 1) if any(s in text[:n] for s in stops)]  # oracle: char by char
    hits = [text[: ends[0]].find(s) for s in stops if s in text[: ends[0]]] if ends else []
    expected = text[: min(hits)] if hits else text
    chunks = ["".join(c) for c in _chunked(list(text), sizes)]
    matcher = StopStringMatcher(stops)
    steps, tail = _feed_all(matcher, chunks)
    assert "".join(s for s, _ in steps) + tail == expected
    assert matcher.stopped == bool(hits)


# --- StreamingText ------------------------------------------------------------------------------------------------


def test_streaming_text_stops_on_a_string_split_across_tokens():
    tok = byte_level_bpe()
    stream = StreamingText(tok, stop=["\n\ndef"])
    out = [stream.push([i]) for i in _encode(tok, CORPUS[-1])]
    assert "".join(d for d, _ in out) == stream.text == "def main():\n    print('hello')"
    assert stream.stopped and stream.stop_reason == "\n\ndef"
    assert stream.push(_encode(tok, "more")) == ("", True) and stream.finish() == ""


def test_streaming_text_stop_inside_multibyte_characters():
    tok = raw_bytes()
    stream = StreamingText(tok, stop=["中文"])
    ids = _encode(tok, "我们的中文字")
    deltas = [stream.push(ids[i : i + 2])[0] for i in range(0, len(ids), 2)]
    _assert_clean(deltas)
    assert stream.text == "我们的" and stream.stopped


def test_streaming_text_finish_releases_held_text_and_tokens():
    tok = raw_bytes()
    stream = StreamingText(tok, stop=["</end>"])
    ids = _encode(tok, "result 😀 </e")
    text, stopped = stream.push(ids[:8])  # "result " + 1 byte of the emoji
    assert (text, stopped) == ("result ", False)
    text, stopped = stream.push(ids[8:])
    assert (text, stopped) == ("😀 ", False)
    assert stream.finish() == "</e"
    assert stream.text == "result 😀 </e" and not stream.stopped and stream.stop_reason is None


def test_streaming_text_rejects_an_empty_stop():
    with pytest.raises(ValueError, match="stop"):
        StreamingText(raw_bytes(), stop=[""])
