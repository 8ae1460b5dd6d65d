"""The closed word-level tokenizer: reversibility, specials, byte fallback, vocabulary."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kcap.data import tokenizer as tk
from kcap.data.biod import BioD, BioDConfig, biod_tokenizer
from kcap.data.bios import BioS, BioSConfig

TOK = tk.default_tokenizer()
BYTE_LO, BYTE_HI = len(tk.SPECIALS), len(tk.SPECIALS) + tk.N_BYTES
VARIANTS = ["online", "simple", "multi3", "permute", "multi4+permute", "fullname",
            "online+fullname"]


def _no_byte_tokens(ids):
    ids = np.asarray(ids)
    return not ((ids >= BYTE_LO) & (ids < BYTE_HI)).any()


def test_specials_have_fixed_ids():
    assert (tk.EOS_ID, tk.PAD_ID, tk.USEFUL_ID) == (0, 1, 2)
    assert TOK.encode("<|endoftext|>") == [0]
    assert TOK.encode("<|pad|>") == [1]
    assert TOK.encode("<|useful|>") == [2]
    assert TOK.decode([2, 0, 1]) == "<|useful|><|endoftext|><|pad|>"
    ids = TOK.encode("<|useful|>Hi.<|endoftext|>")
    assert ids[0] == 2 and ids[-1] == 0 and 0 not in ids[1:-1] and 2 not in ids[1:-1]


def test_id_layout():
    assert TOK.word_offset == 3 + 256
    assert TOK.vocab_size == TOK.word_offset + len(TOK.words)
    assert list(TOK.words) == sorted(TOK.words)
    for i in range(128):
        assert TOK.decode([BYTE_LO + i]) == chr(i)
    assert TOK.decode([BYTE_LO + 0xC3, BYTE_LO + 0xA9]) == "\u00e9"
    w = TOK.words[10]
    assert TOK.piece_id(w) == TOK.word_offset + 10 and TOK.token_text(TOK.piece_id(w)) == w


@pytest.mark.parametrize("variant", VARIANTS)
def test_roundtrip_bios_texts_every_variant_without_bytes(variant):
    ds = BioS(BioSConfig(40, seed=5, variant=variant, marker=True))
    for p in range(0, 40, 3):
        for e in (0, 1, 9):
            text = ds.text(p, e)
            ids = TOK.encode(text)
            assert TOK.decode(ids) == text
            assert _no_byte_tokens(ids), text  # every piece of the data is one word token
            assert ids[0] == tk.USEFUL_ID and ids[-1] == tk.EOS_ID


@pytest.mark.parametrize("cfg", [BioDConfig(20, 3, 2, 10, 2, 50), BioDConfig(10, 1, 1, 1, 1, 1),
                                 BioDConfig(10, 4, 3, 30, 4, 40000)])
def test_roundtrip_biod_texts(cfg):
    ds = BioD(cfg)
    tok = ds.tokenizer
    assert tok.n_symbols == cfg.t and tok.vocab_size == TOK.vocab_size + cfg.t
    for p in range(cfg.n):
        text = ds.text(p, p % 3)
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert _no_byte_tokens(ids)


@pytest.mark.parametrize("text", ["", " ", "  double  spaces  ", "line\nbreak\n\n", "tab\there",
                                  "caf\u00e9 na\u00efve", "emoji \U0001F600\U0001F469\u200d\U0001F4BB",
                                  "\u4e2d\u6587", "<12> <3>,<4>", "<|pad", "trailing space ",
                                  "Zyzzyva Qwxp 12345678901234567890", "\x00\x7f\r\n"])
def test_roundtrip_arbitrary_text(text):
    assert TOK.decode(TOK.encode(text)) == text
    assert "".join(tk.pieces(text)) == text


@settings(max_examples=50, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80))
def test_roundtrip_property(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert "".join(tk.pieces(text)) == text


@settings(max_examples=40, deadline=None, derandomize=True)
@given(words=st.lists(st.sampled_from(["Emma", " Smith", " was", " born", ",", ".", " ", "\n",
                                       "  ", " 1985", "\u00e9t\u00e9", "<|endoftext|>"]),
                      max_size=20))
def test_roundtrip_property_word_soup(words):
    text = "".join(words)
    assert TOK.decode(TOK.encode(text)) == text


def test_encode_deterministic_and_concatenative():
    a = "Emma Briar Smith was born in Chicago, IL."
    assert TOK.encode(a) == TOK.encode(a)
    # A space starts a new piece: ids of parts split before a space concatenate.
    left, right = "Emma Briar", " Smith was born in Chicago, IL."
    assert TOK.encode(a) == TOK.encode(left) + TOK.encode(right)
    assert _no_byte_tokens(TOK.encode(a)) and len(TOK.encode(a)) == 10


def test_unknown_words_fall_back_to_bytes():
    ids = TOK.encode("Zyzzyva")
    assert ids == [BYTE_LO + b for b in b"Zyzzyva"]
    ids = TOK.encode(" \u00e9")
    assert ids == [BYTE_LO + b for b in " \u00e9".encode()]
    assert TOK.decode(ids) == " \u00e9"
    with pytest.raises(KeyError, match="Zyzzyva"):
        TOK.piece_id("Zyzzyva")
    with pytest.raises(KeyError):
        TOK.encode_known("Emma Zyzzyva")


def test_encode_rejects_non_str():
    with pytest.raises(TypeError):
        TOK.encode(b"bytes")


def test_vocabulary_building_is_deterministic():
    words = ["beta", " alpha", "Gamma", ",", " 12", "beta"]
    a, b = tk.Tokenizer(words), tk.Tokenizer(list(reversed(words)))
    assert a.words == b.words == tuple(sorted(set(words)))
    for w in words:
        assert a.piece_id(w) == b.piece_id(w)
    assert tk._corpus_pieces() == tk._corpus_pieces()
    rebuilt = tk.Tokenizer(sorted(tk._corpus_pieces(), reverse=True))
    assert rebuilt.words == TOK.words and rebuilt.vocab_size == TOK.vocab_size
    text = "Emma Briar Smith's major is Computer Science."
    assert rebuilt.encode(text) == TOK.encode(text)


@pytest.mark.parametrize("bad", ["two words", " a b", "a,", "<1><2>", "", "ab\n"])
def test_tokenizer_rejects_multi_piece_entries(bad):
    with pytest.raises(ValueError, match="single piece"):
        tk.Tokenizer(["ok", bad])


def test_tokenizer_rejects_negative_symbols():
    with pytest.raises(ValueError, match="n_symbols"):
        tk.Tokenizer(["ok"], -1)


def test_symbols():
    tok = biod_tokenizer(10)
    assert tok.words == TOK.words and tok.symbol_offset == TOK.vocab_size
    np.testing.assert_array_equal(tok.symbol_ids([0, 9]), [tok.symbol_offset, tok.symbol_offset + 9])
    assert tok.encode("<3><9>") == [tok.symbol_offset + 3, tok.symbol_offset + 9]
    assert tok.encode(" <3>") == [tok.piece_id(" "), tok.symbol_offset + 3]
    assert tok.encode("<10>") == [BYTE_LO + b for b in b"<10>"]  # beyond the alphabet: bytes
    assert tok.decode(tok.encode("<10>")) == "<10>"
    assert TOK.encode("<3>") == [BYTE_LO + b for b in b"<3>"]  # no symbols at all


def test_decode_rejects_ids_beyond_vocab():
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([5, TOK.vocab_size])
    with pytest.raises(ValueError):
        TOK.decode(np.array([TOK.vocab_size + 100]))


def test_decode_rejects_negative_ids():
    with pytest.raises(ValueError):
        TOK.decode([-1])


@pytest.mark.parametrize("text", ["<05>", "<\u0663>"])
def test_roundtrip_non_canonical_symbol_text(text):
    tok = biod_tokenizer(10)
    assert tok.decode(tok.encode(text)) == text
