"""``nexa.formats.read_gguf_metadata`` (a hand-written header reader) reads what the
reference reader, ``gguf.GGUFReader``, reads: the same values for the keys it keeps, with
every kind of value (arrays of strings and numbers, nested arrays) skipped correctly."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from nexa.errors import StoreError
from nexa.formats import _gguf_wanted, read_gguf_metadata
from nexa.testing.hubserver import tiny_gguf_bytes


def reference(path: Path) -> dict:
    """The keys read_gguf_metadata keeps, as gguf.GGUFReader decodes them."""
    out = {}
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if _gguf_wanted(key) and field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            out[key] = field.contents()
    return out


def write(path: Path, fill) -> Path:  # noqa: ANN001
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def everything(writer: gguf.GGUFWriter) -> None:
    # Arrays first, so every wanted key after them is found only if they were skipped right.
    writer.add_token_list(["<s>", "</s>", "hello", "wörld", ""])
    writer.add_token_scores([0.0, -1.5, 2.25, 3.0, 0.5])
    writer.add_token_types([1, 3, 1, 1, 1])
    writer.add_token_merges(["h e", "l l"])
    writer.add_array("test.nested", [[1, 2, 3], [4]])
    writer.add_array("test.nested_strings", [["a", "bc"], ["déf"]])
    writer.add_name("tiny test model")
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_pooling_type(gguf.PoolingType.CLS)
    # The attention shape (what sizes a token's KV cache).
    writer.add_block_count(30)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_key_length(64)
    writer.add_value_length(64)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %} — ünïcode")
    # One wanted key per scalar type the format has.
    writer.add_uint8("u8.context_length", 200)
    writer.add_int8("i8.context_length", -100)
    writer.add_uint16("u16.context_length", 60000)
    writer.add_int16("i16.pooling_type", -30000)
    writer.add_uint32("u32.embedding_length", 4_000_000_000)
    writer.add_int32("i32.embedding_length", -2_000_000_000)
    writer.add_uint64("u64.context_length", 2**40)
    writer.add_int64("i64.context_length", -(2**40))
    writer.add_float32("f32.embedding_length", 1.5)
    writer.add_float64("f64.embedding_length", 2.0**-30)
    writer.add_bool("b.pooling_type", True)
    writer.add_string("s.context_length", "not a number")
    writer.add_array("arr.context_length", [1, 2])  # an array under a wanted name: skipped
    writer.add_string("unrelated.key", "ignored")


def test_matches_gguf_reader_on_every_value_type(tmp_path):
    path = write(tmp_path / "all.gguf", everything)
    ours = read_gguf_metadata(path)
    expected = reference(path)
    assert ours == pytest.approx(expected)
    # The reference really saw what we wrote, so the comparison covers it.
    assert expected["llama.context_length"] == 4096 and expected["u64.context_length"] == 2**40
    assert [expected[f"llama.{k}"] for k in ("block_count", "attention.head_count", "attention.head_count_kv",
                                             "attention.key_length", "attention.value_length")] == [30, 9, 3, 64, 64]
    assert expected["tokenizer.chat_template"].endswith("ünïcode")
    assert "arr.context_length" not in ours and "unrelated.key" not in ours


def test_matches_gguf_reader_on_the_test_kits_gguf(tmp_path):
    path = tmp_path / "kit.gguf"
    path.write_bytes(tiny_gguf_bytes(architecture="qwen2", context_length=32768, name="kit"))
    assert read_gguf_metadata(path) == reference(path) != {}


def test_truncated_header_is_a_store_error(tmp_path):
    whole = write(tmp_path / "whole.gguf", everything).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    with pytest.raises(StoreError, match="not a readable GGUF"):
        read_gguf_metadata(cut)
