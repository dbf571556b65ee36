"""Corrupt and truncated checkpoints give one line naming the file, never a traceback from deep
inside a reader; the input and everything beside it stay as they were."""

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from gqa_t5x.checkpoints import hf as hf_mapping
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.model.config import TransformerConfig

CONFIG = TransformerConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=4, head_dim=4,
                           mlp_dim=24, num_encoder_layers=1, num_decoder_layers=1,
                           relative_attention_num_buckets=8)


def write_hf_safetensors(directory):
    """A Hugging Face T5.1.1 folder written with the safetensors library and plain JSON."""
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_mapping.hf_t5_config_dict(CONFIG), f)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, _, transpose, shape in hf_mapping.parameter_table(CONFIG):
        shape = tuple(reversed(shape)) if transpose else tuple(shape)
        tensors[name] = rng.normal(size=shape).astype(np.float32)
    filename = os.path.join(directory, "model.safetensors")
    save_file(tensors, filename)
    return filename


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def header_size(filename):
    with open(filename, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def truncate_data(filename):
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) - 100)
    return "truncated: tensor "


def truncate_to_4_bytes(filename):
    with open(filename, "r+b") as f:
        f.truncate(4)
    return "4 bytes, shorter than the 8-byte header length"


def huge_header_size(filename):
    with open(filename, "r+b") as f:
        f.write((2**63 + 5).to_bytes(8, "little"))
    return f"its header claims {2**63 + 5:,} bytes"


def garbage_header(filename):
    with open(filename, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\x00garbage")
    return "the header is not JSON"


def empty_file(filename):
    open(filename, "wb").close()
    return "0 bytes, shorter than the 8-byte header length"


@pytest.mark.parametrize("corrupt", [truncate_data, truncate_to_4_bytes, huge_header_size,
                                     garbage_header, empty_file])
def test_corrupt_safetensors_names_the_file(tmp_path, capsys, corrupt):
    filename = write_hf_safetensors(str(tmp_path / "hf"))
    assert header_size(filename) > 8  # the file is a real safetensors file before corruption
    expected = corrupt(filename)
    before = sha(filename)
    rc = convert_cli.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gqa-convert: error: {filename} is not a valid safetensors "
                               f"file (")
    assert expected in lines[0]
    assert sha(filename) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_intact_safetensors_converts(tmp_path, capsys):
    write_hf_safetensors(str(tmp_path / "hf"))
    rc = convert_cli.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "2"])
    assert rc == 0, capsys.readouterr().err
