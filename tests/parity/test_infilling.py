"""Code Llama infilling (text_infilling) against Meta's codellama definitions.

The expected prompt layouts are written here from Meta's codellama source (llama/generation.py
`infilling_prompt_tokens`, llama/tokenizer.py `encode_infilling`/`decode_infilling`), on the raw
sentencepiece processor, not through our tokenizer: PSM is
`[bos, ▁<PRE>] + encode(prefix) + [▁<SUF>] + encode("☺" + suffix)[2:] + [▁<MID>]`, SPM is
`[bos, ▁<PRE>, ▁<SUF>] + encode("☺" + suffix)[2:] + [▁<MID>] + encode(prefix)`. Meta's own
functions cannot be imported in CI (no network to fetch them); they were run once by hand
on the same tokenizer file and gave ids equal to ours (see the README's compatibility section).
"""

import json

import pytest
import sentencepiece as spm
import torch

from helpers.family import CODE_LLAMA_PIECES, train_code_llama_tokenizer, write_family_checkpoint
from llama import Llama, LlamaError
from llama.infilling import infilling_prompt_tokens
from llama.tokenizer import Tokenizer

CASES = [
    ("def mean(xs: list) -> float:\n    \"\"\" ", "\n    return total / len(xs)\n"),
    ("", ""),
    ("x", " y"),
    ("  indented\n", "\n\ttab"),
    ("class Box(Base):\n    def __init__(", "\n\ndef main():\n    pass\n"),
    ("θ₁ ≤ ", " ↔ true"),
    ("text with <PRE> in it ", "and <SUF> <MID> <EOT> too"),
    ("emoji 😀 ", "☺ smile ☺☺"),
    ("trailing space ", "  leading spaces"),
    ("1234567", "89"),
]
MARK = "☺"


def meta_encode_infilling(sp, s):
    return sp.encode(MARK + s)[2:]


def meta_decode_infilling(sp, t):
    return sp.decode([sp.piece_to_id(MARK)] + list(t))[1:]


def meta_layout(sp, prefix, suffix, suffix_first):
    bos, pre, mid, suf = sp.bos_id(), *(sp.piece_to_id(p) for p in CODE_LLAMA_PIECES[:3])
    if suffix_first:
        return [bos, pre, suf] + meta_encode_infilling(sp, suffix) + [mid] + sp.encode(prefix)
    return [bos, pre] + sp.encode(prefix) + [suf] + meta_encode_infilling(sp, suffix) + [mid]


@pytest.fixture(scope="module")
def sp_raw(code_llama_tokenizer):
    return spm.SentencePieceProcessor(model_file=str(code_llama_tokenizer))


@pytest.fixture(scope="module")
def code_llama(code_llama_ckpt):
    return Llama.build(str(code_llama_ckpt), None, max_seq_len=96, max_batch_size=4, device="cpu")


def test_infilling_pieces_are_found_by_name(code_llama_tokenizer, sp_raw):
    tok = Tokenizer(str(code_llama_tokenizer))
    assert [tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id] == [sp_raw.piece_to_id(p) for p in CODE_LLAMA_PIECES]
    assert len({tok.prefix_id, tok.middle_id, tok.suffix_id, tok.eot_id, sp_raw.unk_id()}) == 5


@pytest.mark.parametrize("suffix_first", [False, True], ids=["PSM", "SPM"])
@pytest.mark.parametrize("prefix,suffix", CASES)
def test_prompt_layout_matches_metas_definition(code_llama_tokenizer, sp_raw, prefix, suffix, suffix_first):
    tok = Tokenizer(str(code_llama_tokenizer))
    assert infilling_prompt_tokens(tok, prefix, suffix, suffix_first) == meta_layout(sp_raw, prefix, suffix,
                                                                                      suffix_first)


def test_prompt_layout_by_hand(code_llama_tokenizer, sp_raw):
    """The layouts spelled out as pieces, as Meta's comments write them: "<PRE> {pre} <SUF>{suf} <MID>"
    and "<PRE> <SUF>{suf} <MID> {pre}" (the suffix gets no space of its own)."""
    tok = Tokenizer(str(code_llama_tokenizer))
    pieces = lambda ids: [sp_raw.id_to_piece(i) for i in ids]  # noqa: E731
    assert pieces(infilling_prompt_tokens(tok, "def", " self")) == \
        ["<s>", "▁<PRE>", "▁def", "▁<SUF>", "▁self", "▁<MID>"]
    assert pieces(infilling_prompt_tokens(tok, "def", "self", suffix_first=True)) == \
        ["<s>", "▁<PRE>", "▁<SUF>", "self", "▁<MID>", "▁def"]


@pytest.mark.parametrize("with_mark", [True, False], ids=["mark_is_a_piece", "mark_in_bytes"])
def test_suffix_encoding_keeps_its_first_character(tmp_path, with_mark):
    """No implicit leading space, and decoding gives the text back. Where "☺" is a piece (as in
    Code Llama's and Llama 2's vocabularies) this equals Meta's encode/decode_infilling; ours also
    works where it is not (Meta's [2:] would keep two of its bytes there)."""
    path = train_code_llama_tokenizer(tmp_path / "tokenizer.model", with_mark=with_mark)
    tok, sp = Tokenizer(str(path)), spm.SentencePieceProcessor(model_file=str(path))
    for _, suffix in CASES:
        ids = tok.encode_infilling(suffix)
        assert tok.decode_infilling(ids) == suffix
        if suffix[:1].isalnum():
            assert sp.id_to_piece(ids[0])[0] != "▁"
        if with_mark:
            assert ids == meta_encode_infilling(sp, suffix)
            assert tok.decode_infilling(ids) == meta_decode_infilling(sp, ids)


def test_suffix_encoding_matches_meta_on_llama2_vocabulary(sp_tokenizer):
    """A real 32k Llama 2-kind vocabulary (where "☺" is a piece): same ids as Meta's trick."""
    tok, sp = Tokenizer(sp_tokenizer), spm.SentencePieceProcessor(model_file=sp_tokenizer)
    for _, suffix in CASES:
        assert tok.encode_infilling(suffix) == meta_encode_infilling(sp, suffix)


def test_text_infilling_greedy_stops_at_eot(code_llama, monkeypatch):
    """The generation is the greedy continuation of Meta's prompt cut before the first ▁<EOT>
    (not at EOS), decoded without dropping its leading space; full_text joins the three.
    The logits are steered by a hook on the model's output layer, so decode steps run in
    PyTorch (LLAMA_NATIVE=0): the native step does not call the model's modules."""
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    tok = code_llama.tokenizer
    prefix, suffix = CASES[0]
    calls = []

    def force(module, inputs, logits):
        """EOS becomes the greedy choice for generated token 1, ▁<EOT> for token 4."""
        forced = {1: tok.eos_id, 4: tok.eot_id}.get(len(calls))
        calls.append(1)
        if forced is not None:
            logits[..., forced] += 1e4

    hook = code_llama.model.output.register_forward_hook(force)
    try:
        prompt = infilling_prompt_tokens(tok, prefix, suffix)
        raw, _ = code_llama.generate([prompt], max_gen_len=12, temperature=0, stop_tokens=[])
        calls.clear()
        [result] = code_llama.text_infilling([prefix], [suffix], temperature=0, max_gen_len=12, logprobs=True)
    finally:
        hook.remove()
    middle = raw[0][:4]
    assert raw[0][1] == tok.eos_id and raw[0][4] == tok.eot_id and len(raw[0]) == 12
    assert result["tokens"] == [tok.sp_model.id_to_piece(i) for i in middle]
    assert result["generation"] == tok.sp_model.decode([tok.sp_model.piece_to_id(MARK)] + middle)[1:]
    assert result["full_text"] == prefix + result["generation"] + suffix
    assert len(result["logprobs"]) == len(middle) and all(lp <= 0 for lp in result["logprobs"])


def test_text_infilling_batch_and_spm(code_llama):
    """Several gaps at once, each as it would be alone; SPM runs its own layout."""
    prefixes, suffixes = [c[0] for c in CASES[:4]], [c[1] for c in CASES[:4]]
    together = code_llama.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=6)
    alone = [code_llama.text_infilling([p], [s], temperature=0, max_gen_len=6)[0] for p, s in zip(prefixes, suffixes)]
    assert together == alone
    assert all(set(r) == {"generation", "full_text"} for r in together)
    spm_result = code_llama.text_infilling(prefixes[:1], suffixes[:1], temperature=0, max_gen_len=6,
                                           suffix_first=True)
    prompt = infilling_prompt_tokens(code_llama.tokenizer, prefixes[0], suffixes[0], suffix_first=True)
    tokens, _ = code_llama.generate([prompt], max_gen_len=6, temperature=0, stop_tokens=[code_llama.tokenizer.eot_id])
    assert spm_result[0]["generation"] == code_llama.tokenizer.decode_infilling(tokens[0])


def test_text_infilling_in_bf16(code_llama_ckpt):
    """The default dtype on this CPU: runs and returns Meta's shape."""
    gen = Llama.build(str(code_llama_ckpt), None, max_seq_len=96, max_batch_size=4, device="cpu", dtype="bf16")
    results = gen.text_infilling([CASES[0][0]], [CASES[0][1]], max_gen_len=5, logprobs=True)
    assert set(results[0]) == {"generation", "full_text", "tokens", "logprobs"}


def test_code_llama_rope_theta_reaches_the_model(code_llama_ckpt, code_llama):
    """Code Llama's params.json writes rope_theta as the integer 1000000 (HF parity at 1e6:
    test_hf_parity.py's codellama_rope case)."""
    assert json.loads((code_llama_ckpt / "params.json").read_text())["rope_theta"] == 1000000
    assert code_llama.model.params.rope_theta == 1e6
    half = code_llama.model.params.head_dim // 2
    expected = 1e6 ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.angle(code_llama.model.rope[1]).double()  # the rotation at position 1
    torch.testing.assert_close(angles, expected, rtol=1e-5, atol=1e-7)


def test_llama2_tokenizer_refused(generator, sp_tokenizer):
    with pytest.raises(LlamaError, match=r"lacks \(▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>\).*tokenizer.model.v1|"
                                         r"tokenizer.model.v1.*lacks"):
        generator.text_infilling(["def f("], ["):"])


def test_llama3_tokenizer_refused(tmp_path, llama3_tokenizer):
    ckpt = write_family_checkpoint(tmp_path / "llama3", llama3_tokenizer, dim=32)
    gen = Llama.build(str(ckpt), None, max_seq_len=32, max_batch_size=2, device="cpu")
    with pytest.raises(LlamaError, match="TiktokenTokenizer.*text_completion"):
        gen.text_infilling(["def f("], ["):"])


@pytest.mark.parametrize("prefixes,suffixes,match", [
    (["a", "b"], ["c"], "2 prefixes but 1 suffixes"),
    ([], [], "prefixes must be a non-empty list"),
    ("abc", ["d"], "prefixes must be a non-empty list"),
    (["a"], [None], r"suffixes\[0\] must be text"),
    (["a\ud800"], ["b"], r"prefixes\[0\] is not valid Unicode"),
])
def test_bad_arguments(code_llama, prefixes, suffixes, match):
    with pytest.raises(LlamaError, match=match):
        code_llama.text_infilling(prefixes, suffixes)
