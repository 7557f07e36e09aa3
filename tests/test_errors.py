"""Every bad input gives one clear message naming the file and what is wrong,
and never takes the interpreter down."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.dataset import load_jsonl
from edge_zo.errors import IncompatibleAdapterError, InvalidInputError, ModelFileError
from edge_zo.runtime import Runtime, RuntimeOptions

OPTS = RuntimeOptions(batch_size=2, max_tokens=64)


def test_missing_model(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        Runtime(tmp_path / "nope.gguf", OPTS)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf at all" * 100, b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_corrupt_model(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.gguf"):
        Runtime(bad, OPTS)


def test_truncated_model_is_refused_by_llama_cpp(tiny_q4, tmp_path):
    # The header parses but the tensor data is cut short: llama.cpp must refuse, not crash.
    data = tiny_q4.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        Runtime(cut, OPTS)


def _adapter(name="blk.0.attn_q.weight", idx=(1, 5, 9), arch="llama"):
    return SparseAdapter.from_weights(arch, {name: (np.array(idx), np.ones(len(idx), np.float32))})


def test_adapter_for_another_architecture(tiny_q4):
    with Runtime(tiny_q4.path, OPTS) as rt, pytest.raises(IncompatibleAdapterError, match="architecture 'gemma3'"):
        rt.attach(_adapter(arch="gemma3"))


def test_adapter_weight_missing_and_out_of_range_listed_together(tiny_q4):
    bad = SparseAdapter.from_weights("llama", {
        "blk.9.attn_q.weight": (np.array([1]), np.ones(1, np.float32)),
        "blk.0.attn_k.weight": (np.array([10**7]), np.ones(1, np.float32)),
    })
    with Runtime(tiny_q4.path, OPTS) as rt, pytest.raises(IncompatibleAdapterError) as err:
        rt.attach(bad)
    assert "blk.9.attn_q.weight: the model has no such weight" in str(err.value)
    assert "blk.0.attn_k.weight: index 10000000 is out of range" in str(err.value)


def test_unsorted_or_duplicate_indices_rejected(tiny_q4):
    a = _adapter()
    a.indices[0] = np.array([5, 5, 9])
    with pytest.raises(InvalidInputError, match="strictly increasing"):
        a.validate()
    with Runtime(tiny_q4.path, OPTS) as rt, pytest.raises(InvalidInputError, match="strictly increasing"):
        rt.native.add_sparse("blk.0.attn_q.weight", (64, 64), np.array([9, 5]), np.ones(2, np.float32))


def test_native_checks_even_without_python_validation(tiny_q4):
    with Runtime(tiny_q4.path, OPTS) as rt:
        with pytest.raises(InvalidInputError, match="outside the weight"):
            rt.native.add_sparse("blk.0.attn_q.weight", (64, 64), np.array([64 * 64]), np.ones(1, np.float32))
        with pytest.raises(InvalidInputError, match="2 indices but 3 values"):
            rt.native.add_sparse("blk.0.attn_q.weight", (64, 64), np.array([1, 2]), np.ones(3, np.float32))
        with pytest.raises(InvalidInputError, match="float32"):
            rt.native.add_sparse("blk.0.attn_q.weight", (64, 64), np.array([1, 2]), np.ones(2, np.float64))
        # A shape that does not match the real weight is caught at forward time, not by a crash.
        rt.native.add_sparse("blk.0.attn_q.weight", (32, 128), np.array([1]), np.ones(1, np.float32))
        with pytest.raises(InvalidInputError, match="has shape"):
            rt.native.loss(np.array([1, 2, 3]), np.array([0, 1, 1]), np.array([0, 3]))


def test_bad_token_batches(tiny_q4):
    with Runtime(tiny_q4.path, OPTS) as rt:
        with pytest.raises(InvalidInputError, match="out of range"):
            rt.native.loss(np.array([1, 10**6]), np.array([0, 1]), np.array([0, 2]))
        with pytest.raises(InvalidInputError, match="first token cannot be a target"):
            rt.native.loss(np.array([1, 2]), np.array([1, 1]), np.array([0, 2]))
        with pytest.raises(InvalidInputError, match="tokens per sequence|holds"):
            rt.native.loss(np.ones(300, np.int32), np.ones(300, np.uint8) * (np.arange(300) > 0), np.array([0, 300]))


def _write(path, text):
    path.write_text(text)
    return path


def test_adapter_file_errors(tmp_path, tiny_q4):
    with pytest.raises(ModelFileError, match="no such adapter"):
        SparseAdapter.load(tmp_path / "none.gguf")
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        SparseAdapter.load(_write(tmp_path / "junk.gguf", "junk"))
    with pytest.raises(ModelFileError, match="not a sparse adapter"):
        SparseAdapter.load(tiny_q4.path)  # a model, not an adapter


def test_adapter_with_mismatched_lengths_on_disk(tmp_path):
    import gguf

    path = tmp_path / "mismatch.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "sparse")
    w.add_uint32("adapter.sparse.format_version", 1)
    w.add_tensor("blk.0.attn_q.weight.sparse_idx", np.array([1, 2, 3], np.int32))
    w.add_tensor("blk.0.attn_q.weight.sparse_val", np.ones(2, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="3 indices but 2 values"):
        SparseAdapter.load(path)


GOOD = json.dumps({"prompt": "x", "completion": " y"})


@pytest.mark.parametrize("lines,why", [
    ([GOOD, "{not json"], ":2: not valid JSON"),
    ([GOOD, "[1, 2]"], ":2: expected a JSON object"),
    (['{"foo": 1}'], ":1: cannot tell the format"),
    ([GOOD, '{"text": "z"}'], ":2: 'prompt' must be a string"),
    ([GOOD, '{"prompt": "a", "completion": 3}'], ":2: 'completion' must be a string"),
    ([GOOD, "", '{"prompt": "a", "completion": " b", "choices": [" c", " d"]}'], ":3: 'completion' must be one of"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: no 'assistant' message"),
    ([""], "has no records"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, why):
    path = _write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError) as err:
        load_jsonl(path)
    assert str(path) in str(err.value) and why in str(err.value)


def test_cli_reports_errors_without_traceback(tmp_path, tiny_q4, capsys):
    data = _write(tmp_path / "d.jsonl", '{"text": "hello there"}\n{"text": 5}\n')
    assert cli(["eval", str(tiny_q4.path), str(data)]) == 1
    err = capsys.readouterr().err
    assert "d.jsonl:2" in err and "Traceback" not in err
    good = _write(tmp_path / "ok.jsonl", '{"text": "hello there"}\n')
    assert cli(["eval", str(tmp_path / "missing.gguf"), str(good)]) == 1
    assert "no such model file" in capsys.readouterr().err
    bad = tmp_path / "other.gguf"
    _adapter(arch="gemma3").save(bad)
    assert cli(["eval", str(tiny_q4.path), str(good), "--adapter", str(bad)]) == 1
    assert "architecture 'gemma3'" in capsys.readouterr().err
