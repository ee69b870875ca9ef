"""Every file the engine reads gets a LlamaError naming the file and the field, never a
TypeError, KeyError or SafetensorError from deep inside: HF config.json, tokenizer_config.json
and special_tokens_map.json with wrong types, zero or absurd values, bad JSON or a list
where an object belongs; safetensors with lying headers, non-float or duplicated tensors;
an untied model without lm_head; GGUF offsets and sizes that overflow. And every CLI takes
path flags as typed (fire would turn `--ckpt_dir 2024` into an int)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from helpers.foreign import write_tiny_gguf, write_tiny_hf_dir
from llama import LlamaError, Tokenizer
from llama.convert import convert


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    return write_tiny_hf_dir(tmp_path_factory.mktemp("hf") / "model")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not ...}))


FIELD = r"is invalid, it must be"
CONFIG_CASES = {
    "bad_json": (lambda p: p.write_text('{"hidden_size": 8,'), r"cannot read '.*config\.json' \(JSONDecodeError"),
    "list": (lambda p: p.write_text("[8, 1, 2]"), r"config\.json' holds a JSON list, not an object"),
    "wrong_type": (lambda p: _edit_json(p, hidden_size="8"), rf"config\.json': hidden_size = '8' {FIELD} an integer"),
    "bool_for_int": (lambda p: _edit_json(p, vocab_size=True), rf"vocab_size = True {FIELD}"),
    "zero_layers": (lambda p: _edit_json(p, num_hidden_layers=0), rf"num_hidden_layers = 0 {FIELD}"),
    "absurd_heads": (lambda p: _edit_json(p, num_attention_heads=10**12), rf"num_attention_heads = 1000000000000 {FIELD}"),
    "huge_int": (lambda p: _edit_json(p, intermediate_size=10**400), rf"intermediate_size = \d+\.\.\. {FIELD}"),
    "nan_eps": (lambda p: p.write_text(p.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')),
                rf"rms_norm_eps = nan {FIELD} a positive finite number"),
    "zero_theta": (lambda p: _edit_json(p, rope_theta=0), rf"rope_theta = 0 {FIELD}"),
    "list_for_rope": (lambda p: _edit_json(p, rope_scaling=[8.0]), rf"rope_scaling = \[8\.0\] {FIELD} a JSON object"),
    "rope_factor_text": (lambda p: _edit_json(p, rope_scaling={"rope_type": "llama3", "factor": "8"}),
                         rf"rope_scaling\.factor = '8' {FIELD}"),
    "rope_factor_missing": (lambda p: _edit_json(p, rope_scaling={"rope_type": "llama3"}),
                            r"lacks the field 'rope_scaling\.factor'"),
    "tie_text": (lambda p: _edit_json(p, tie_word_embeddings="yes"), rf"tie_word_embeddings = 'yes' {FIELD} true or false"),
    "model_type_number": (lambda p: _edit_json(p, model_type=5), rf"model_type = 5 {FIELD} a string"),
    "missing_field": (lambda p: _edit_json(p, hidden_size=...), r"config\.json' lacks the field 'hidden_size'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_hf_config_mistakes_name_the_file_and_field(case, hf_src, tmp_path):
    src = _copy(hf_src, tmp_path)
    damage, message = CONFIG_CASES[case]
    damage(src / "config.json")
    with pytest.raises(LlamaError, match=message):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_untied_model_without_lm_head_is_refused_and_tied_one_converts(hf_src, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_src, tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(LlamaError, match=r"config\.json' says tie_word_embeddings is false .* no lm_head\.weight"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    _edit_json(src / "config.json", tie_word_embeddings=...)  # absent: HF's default (false) applies
    with pytest.raises(LlamaError, match="no lm_head.weight"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    _edit_json(src / "config.json", tie_word_embeddings=True)
    out = convert(str(src), str(tmp_path / "out"), dtype="fp32")
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert torch.equal(state["output.weight"], weights["model.embed_tokens.weight"])


def test_weights_in_two_files_or_of_integer_type_are_refused(hf_src, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_src, tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    save_file({"model.norm.weight": weights["model.norm.weight"]}, str(src / "model-extra.safetensors"))
    with pytest.raises(LlamaError, match=r"weight 'model\.norm\.weight' is in both '.*model-extra\.safetensors' "
                                         r"and '.*model\.safetensors'; remove the stray file"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    (src / "model-extra.safetensors").unlink()
    save_file({**weights, "model.norm.weight": torch.ones(8, dtype=torch.int32)}, str(src / "model.safetensors"))
    with pytest.raises(LlamaError, match=r"weight 'model\.norm\.weight' in '.*model\.safetensors' is of type "
                                         r"torch\.int32; Llama weights are floating point"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")


def _header(path: Path) -> tuple:
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def _write_with_header(path: Path, header: dict, body: bytes, pad_to: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * max(0, pad_to - len(text))
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize("lie", ["offsets_past_the_end", "shape_of_other_size", "overlapping", "unknown_dtype",
                                 "header_length_huge"])
def test_safetensors_with_a_lying_header_name_the_file(lie, hf_src, tmp_path):
    src = _copy(hf_src, tmp_path)
    path = src / "model.safetensors"
    header, body = _header(path)
    size = len(json.dumps(header))
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    if lie == "offsets_past_the_end":
        header[name]["data_offsets"] = [begin, len(body) + 4096]
    elif lie == "shape_of_other_size":
        header[name]["shape"] = [16]
    elif lie == "overlapping":
        other = header["lm_head.weight"]["data_offsets"]
        header[name]["data_offsets"] = [other[0], other[0] + end - begin]
    elif lie == "unknown_dtype":
        header[name]["dtype"] = "F33"
    if lie == "header_length_huge":
        path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])
    else:
        _write_with_header(path, header, body, pad_to=size)
    with pytest.raises(LlamaError, match=r"cannot read '.*model\.safetensors': its header or data is damaged"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")


# ---- tokenizer_config.json and special_tokens_map.json ------------------------------------------------

TOKEN_CONFIG_CASES = {
    "bad_json": ('{"eos_token": ', r"cannot read '.*{file}' \(JSONDecodeError"),
    "list": ('["<|im_end|>"]', r"{file}' holds a JSON list, not an object"),
    "number_token": ('{"eos_token": 7}', rf"{{file}}': eos_token = 7 {FIELD} a string or an object"),
    "list_token": ('{"bos_token": ["<|im_start|>"]}', r"bos_token = \['<\|im_start\|>'\] is invalid"),
    "object_without_content": ('{"pad_token": {"text": "a"}}', r"pad_token = \{'text': 'a'\} is invalid"),
    "text_for_bool": ('{"add_bos_token": "false"}', rf"add_bos_token = 'false' {FIELD} true or false"),
    "unknown_token": ('{"eos_token": "<|nope|>"}', r"eos_token '<\|nope\|>' .* is not in the vocabulary"),
}


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("case", TOKEN_CONFIG_CASES)
def test_token_config_mistakes_name_the_file_and_field(file, case, hf_src, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(hf_src / "tokenizer.json", folder / "tokenizer.json")
    text, message = TOKEN_CONFIG_CASES[case]
    (folder / file).write_text(text)
    with pytest.raises(LlamaError, match=message.replace("{file}", file.replace(".", r"\."))):
        Tokenizer(str(folder / "tokenizer.json"))


def test_chat_template_of_the_wrong_kind_is_named_and_named_templates_work(hf_src, tmp_path):
    src = _copy(hf_src, tmp_path)
    _edit_json(src / "tokenizer_config.json", chat_template=5)
    with pytest.raises(LlamaError, match=rf"tokenizer_config\.json': chat_template = 5 {FIELD} a string or"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    template = json.loads((hf_src / "tokenizer_config.json").read_text())["chat_template"]
    _edit_json(src / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "x"},
                                                             {"name": "default", "template": template}])
    out = convert(str(src), str(tmp_path / "out"), dtype="fp32")
    assert json.loads((out / "params.json").read_text())["chat_format"] == "chatml"


# ---- GGUF offsets and sizes ------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("overflow", ["offset", "dims"])
def test_gguf_offsets_and_sizes_that_overflow_are_refused(overflow, tmp_path):
    """The gguf reader adds them in 64-bit numpy integers, which wrap around without a word: an
    offset of 2^64 - data_start made it read the file's own header as weights."""
    import gguf

    src = write_tiny_gguf(tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(src))
    field = next(t.field for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    data = bytearray(src.read_bytes())
    if overflow == "offset":
        at = field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
        struct.pack_into("<Q", data, at, 2**64 - reader.data_offset)
    else:
        at = field.offset + sum(int(p.nbytes) for p in field.parts[:3])
        struct.pack_into("<QQ", data, at, 2**32, 2**32)
    src.write_bytes(bytes(data))
    with pytest.raises(LlamaError, match=r"model\.gguf"):
        convert(str(src), str(tmp_path / "out"), dtype="fp32")
    assert not (tmp_path / "out").exists()


# ---- path flags are text ------------------------------------------------------------------------------

@pytest.mark.subprocess
def test_every_cli_takes_path_flags_as_typed(tmp_path, tiny_ckpt, sp_tokenizer):
    """Folders and files named 2024, 1e3 and 0x10: fire would pass 2024, 1000.0 and 16."""
    shutil.copytree(tiny_ckpt, tmp_path / "2024")
    (tmp_path / "1e3").write_text('{"id": 1, "prompt": "Hello"}\n')
    write_tiny_gguf(tmp_path / "tiny.gguf")
    env = dict(os.environ, PYTHONPATH=str(REPO), LLAMA_PROGRESS="0", OMP_NUM_THREADS="1")
    model = ["--ckpt_dir", "2024", "--tokenizer_path", sp_tokenizer, "--max_seq_len", "64", "--max_gen_len", "2"]
    runs = {
        "text": [str(REPO / "example_text_completion.py"), *model],
        "chat": [str(REPO / "example_chat_completion.py"), *model],
        "repl": ["-m", "llama.chat", *model],
        "batch": ["-m", "llama.batch", "--input", "1e3", "--output", "0x10", *model],
        "convert": ["-m", "llama.convert", "tiny.gguf", "2e3"],
    }
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=str(tmp_path), env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in runs.items()}
    results = {name: proc.communicate("/exit\n", timeout=300) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, results[name][1][-2000:])
    assert "Chatting with 2024" in results["repl"][0]
    assert json.loads((tmp_path / "0x10").read_text())["id"] == 1
    assert (tmp_path / "2e3" / "params.json").is_file()
