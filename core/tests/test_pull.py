"""`nexa pull ORG/REPO[:QUANT]`: the real huggingface_hub client against a loopback Hub.

Every test talks HTTP to ``nexa.testing.hubserver.HubServer`` on 127.0.0.1 through
``HF_ENDPOINT``, the way a user points nexa at a mirror. The server's counters show what
the client really fetched (resume, files skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nexa import hub as hub_module
from nexa.errors import StoreError
from nexa.hub import RemoteFile, choose_files, pull
from nexa.store import ModelStore
from nexa.testing import wait_until
from nexa.testing.hubserver import HubServer, tiny_gguf_bytes
from nexa.types import Task

GGUF_REPO = "acme/Vision-GGUF"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def ggufs() -> dict[str, bytes]:
    """Three quants of one tiny model, two projectors, and a README."""
    return {
        "Vision-Q4_K_M.gguf": tiny_gguf_bytes(pad_bytes=300_000, name="vision"),
        "Vision-Q8_0.gguf": tiny_gguf_bytes(pad_bytes=500_000, name="vision", context_length=4096),
        "Vision-F16.gguf": tiny_gguf_bytes(pad_bytes=900_000, name="vision"),
        "mmproj-Vision-F16.gguf": tiny_gguf_bytes(architecture="clip", chat_template=None,
                                                  pad_bytes=20_000),
        "mmproj-Vision-F32.gguf": tiny_gguf_bytes(architecture="clip", chat_template=None,
                                                  pad_bytes=40_000),
        "README.md": b"# Vision GGUF\n\n![demo](demo.png)\n",
        "demo.png": b"\x89PNG\r\n\x1a\n not really",
    }


@pytest.fixture
def hub(ggufs, env):
    with HubServer({GGUF_REPO: ggufs}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        yield server


def file_requests(server: HubServer, repo: str) -> set[str]:
    return {what for (_, r, what), n in server.requests.items() if r == repo and n and
            not what.startswith("api")}


def leftover_partials(store: ModelStore) -> list[Path]:
    blobs = store.partial_dir / "blobs"
    return sorted(p for p in blobs.glob("*") if not p.name.endswith(".lock")) if blobs.is_dir() else []


# --- GGUF repos ------------------------------------------------------------------------


def test_full_pull_takes_default_quant_and_projector_only(hub, store, ggufs):
    manifest = pull(store, GGUF_REPO)

    assert manifest.name == GGUF_REPO
    assert manifest.format == "gguf"
    assert manifest.quant == "Q4_K_M"
    assert manifest.tasks == {Task.CHAT, Task.VLM}
    assert manifest.context_length == 2048
    assert manifest.source == f"hf:{GGUF_REPO}@{hub.commits[GGUF_REPO]}"
    by_path = {f.path: f for f in manifest.files}
    assert set(by_path) == {"Vision-Q4_K_M.gguf", "mmproj-Vision-F16.gguf"}
    for path, f in by_path.items():
        assert f.size == len(ggufs[path])
        assert f.sha256 == sha256(ggufs[path])
        assert (manifest.root / path).read_bytes() == ggufs[path]
    assert by_path["mmproj-Vision-F16.gguf"].role == "mmproj"
    # Only the chosen files crossed the wire; README, images and other quants never did.
    assert file_requests(hub, GGUF_REPO) == {
        "Vision-Q4_K_M.gguf", "cdn:Vision-Q4_K_M.gguf",
        "mmproj-Vision-F16.gguf", "cdn:mmproj-Vision-F16.gguf",
    }
    assert [m.name for m in store.list()] == [GGUF_REPO]
    assert store.get(f"{GGUF_REPO}:q4_k_m").root == manifest.root
    # The manifest on disk says the same, and nothing is left half-done.
    on_disk = json.loads((manifest.root / "manifest.json").read_text())
    assert on_disk["quant"] == "Q4_K_M"
    assert leftover_partials(store) == []
    assert not any(store.partial_dir.glob("staged-*"))


def test_pulling_again_is_a_no_op_until_the_repo_or_quant_changes(hub, store, ggufs):
    first = pull(store, GGUF_REPO)
    hub.reset_counters()
    again = pull(store, GGUF_REPO)
    assert again == first
    assert file_requests(hub, GGUF_REPO) == set()  # only the repo info was asked for
    # A deleted file is fetched again.
    (first.root / "mmproj-Vision-F16.gguf").unlink()
    repaired = pull(store, GGUF_REPO)
    assert (repaired.root / "mmproj-Vision-F16.gguf").read_bytes() == ggufs["mmproj-Vision-F16.gguf"]
    # A new commit on the hub is pulled again: the changed file is fetched, the unchanged
    # one is linked from the installed model instead of crossing the wire again.
    new_weights = tiny_gguf_bytes(pad_bytes=300_000, name="vision v2")
    hub.add_repo(GGUF_REPO, {**ggufs, "Vision-Q4_K_M.gguf": new_weights})
    hub.reset_counters()
    updated = pull(store, GGUF_REPO)
    assert updated.source == f"hf:{GGUF_REPO}@{hub.commits[GGUF_REPO]}" != first.source
    assert file_requests(hub, GGUF_REPO) == {"Vision-Q4_K_M.gguf", "cdn:Vision-Q4_K_M.gguf"}
    assert updated.file_path("weights").read_bytes() == new_weights
    assert (updated.root / "mmproj-Vision-F16.gguf").read_bytes() == ggufs["mmproj-Vision-F16.gguf"]


def test_a_second_pull_of_the_same_model_at_once_is_refused(hub, store, ggufs):
    import threading

    path = "Vision-Q4_K_M.gguf"
    hub.stall_at[(GGUF_REPO, path)] = 10_000
    results: list[object] = []
    first = threading.Thread(
        target=lambda: results.append(pull(store, GGUF_REPO)), daemon=True
    )
    first.start()
    try:
        assert hub.stalled.wait(30)
        with pytest.raises(StoreError, match="another pull of acme/Vision-GGUF is running"):
            pull(store, GGUF_REPO)
    finally:
        hub.stall_at.clear()
        hub.release()
        first.join(60)
    # The first pull was not disturbed: it resumed after the stall and finished.
    (manifest,) = results
    assert manifest.file_path("weights").read_bytes() == ggufs[path]


def test_explicit_quant_is_case_insensitive(hub, store, ggufs):
    manifest = pull(store, f"{GGUF_REPO}:q8_0")
    assert manifest.quant == "Q8_0"
    assert manifest.context_length == 4096
    assert {f.path for f in manifest.files} == {"Vision-Q8_0.gguf", "mmproj-Vision-F16.gguf"}
    assert store.get(f"{GGUF_REPO}:Q8_0").quant == "Q8_0"
    # Named as pulled, with the quant's canonical label.
    assert manifest.name == f"{GGUF_REPO}:Q8_0"
    assert [m.name for m in store.list()] == [f"{GGUF_REPO}:Q8_0"]
    assert (store.models_dir / "acme" / "Vision-GGUF@Q8_0" / "manifest.json").is_file()


def test_missing_quant_lists_the_available_ones(hub, store):
    with pytest.raises(StoreError) as err:
        pull(store, f"{GGUF_REPO}:Q2_K")
    assert "Q2_K" in err.value.message
    for label in ("F16", "Q4_K_M", "Q8_0"):
        assert label in err.value.message
    assert store.list() == []
    assert file_requests(hub, GGUF_REPO) == set()


def test_split_gguf_takes_every_part_of_the_chosen_quant(env, store):
    first = tiny_gguf_bytes(pad_bytes=2_000)
    files = {
        "Q4_K_M/Big-Q4_K_M-00001-of-00003.gguf": first,
        "Q4_K_M/Big-Q4_K_M-00002-of-00003.gguf": b"part two" * 100,
        "Q4_K_M/Big-Q4_K_M-00003-of-00003.gguf": b"part three" * 100,
        "Big-Q8_0.gguf": tiny_gguf_bytes(pad_bytes=9_000),
        "Big-IQ2_XS-00001-of-00002.gguf": tiny_gguf_bytes(pad_bytes=500),  # part 2 missing
    }
    with HubServer({"acme/Big-GGUF": files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        manifest = pull(store, "acme/Big-GGUF")
        with pytest.raises(StoreError, match="available: Q4_K_M, Q8_0"):
            pull(store, "acme/Big-GGUF:IQ2_XS")
    assert manifest.quant == "Q4_K_M"
    assert [f.path for f in manifest.files] == [
        f"Q4_K_M/Big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    assert manifest.file_path("weights").name == "Big-Q4_K_M-00001-of-00003.gguf"
    assert all((manifest.root / f.path).read_bytes() == files[f.path] for f in manifest.files)


@pytest.mark.parametrize(
    ("names", "quant", "expected"),
    [
        (["m-Q8_0.gguf", "m-Q4_K_S.gguf", "m-Q4_K_M.gguf"], None, ["m-Q4_K_M.gguf"]),
        (["m-Q8_0.gguf", "m-Q6_K.gguf", "m-BF16.gguf"], None, ["m-Q6_K.gguf"]),
        (["m.Q2_K.gguf", "m.TQ1_0.gguf"], None, ["m.TQ1_0.gguf"]),  # none preferred: smallest
        (["m.Q2_K.gguf", "m.TQ1_0.gguf"], "tq1_0", ["m.TQ1_0.gguf"]),
        (["gpt-oss-20b-mxfp4.gguf", "gpt-oss-20b-F16.gguf"], "MXFP4", ["gpt-oss-20b-mxfp4.gguf"]),
        (["m-f16.gguf", "m-q5_k_m.gguf"], "F16", ["m-f16.gguf"]),
        (["m-f16.gguf", "m-q5_k_m.gguf"], "fp16", ["m-f16.gguf"]),
        (["m-UD-Q4_K_XL.gguf", "m-Q8_0.gguf"], "UD-Q4_K_XL", ["m-UD-Q4_K_XL.gguf"]),
        (["model.gguf"], None, ["model.gguf"]),
        (["m-Q4_K_M.gguf", "mmproj-Q8_0.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf"], None,
         ["m-Q4_K_M.gguf", "mmproj-BF16.gguf"]),
        (["m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-Q4_K_M.gguf", "mmproj-m-Q5_0.gguf"], "Q8_0",
         ["m-Q8_0.gguf", "mmproj-m-Q4_K_M.gguf"]),  # no preferred precision: smallest
        (["m-Q4_K_M.gguf", "imatrix.dat", "config.json", "LICENSE", "params"], None,
         ["m-Q4_K_M.gguf"]),
    ],
)
def test_gguf_choice(names, quant, expected):
    sizes = {"m.Q2_K.gguf": 900, "m.TQ1_0.gguf": 500, "mmproj-m-Q4_K_M.gguf": 10,
             "mmproj-m-Q5_0.gguf": 20}
    files = [RemoteFile(n, size=sizes.get(n, 100), sha256="0" * 64) for n in names]
    chosen, _ = choose_files(files, quant)
    assert [f.path for f in chosen] == expected


# --- resume ----------------------------------------------------------------------------


def test_cut_off_pull_resumes_in_a_new_call_from_the_last_byte(hub, store, ggufs):
    path = "Vision-Q4_K_M.gguf"
    size = len(ggufs[path])
    cut = 123_457
    hub.drop_at[(GGUF_REPO, path)] = cut  # the link dies at this byte, on every retry

    with pytest.raises(StoreError, match=f"stopped at byte {cut} of {size}.*run the same pull again"):
        pull(store, GGUF_REPO)
    assert store.list() == []
    assert not (store.models_dir / GGUF_REPO).exists()
    assert hub.bytes_served[(GGUF_REPO, path)] == cut
    (part,) = [p for p in leftover_partials(store) if p.name.endswith(".part")]
    assert part.stat().st_size == cut

    hub.drop_at.clear()
    hub.reset_counters()
    manifest = pull(store, GGUF_REPO)

    assert hub.range_starts[(GGUF_REPO, path)] == [cut]
    assert hub.bytes_served[(GGUF_REPO, path)] == size - cut
    weights = manifest.file_path("weights")
    assert weights.read_bytes() == ggufs[path]
    assert manifest.files[0].sha256 == sha256(ggufs[path])
    assert leftover_partials(store) == []


def test_dropped_connection_is_resumed_within_one_call(hub, store, ggufs):
    path = "Vision-Q4_K_M.gguf"
    hub.drop_once_at[(GGUF_REPO, path)] = 50_001
    manifest = pull(store, GGUF_REPO)
    assert hub.range_starts[(GGUF_REPO, path)] == [0, 50_001]
    assert hub.bytes_served[(GGUF_REPO, path)] == len(ggufs[path])
    assert manifest.file_path("weights").read_bytes() == ggufs[path]


def test_server_errors_are_retried_then_reported(hub, store, ggufs):
    path = "Vision-Q4_K_M.gguf"
    hub.fail_status[(GGUF_REPO, path)] = 503
    with pytest.raises(StoreError, match="run the same pull again"):
        pull(store, GGUF_REPO)
    # 503 is transient: retried RETRIES times before giving up, then a clear error.
    assert hub.requests[("GET", GGUF_REPO, f"cdn:{path}")] == hub_module.RETRIES + 1
    hub.fail_status.clear()
    assert pull(store, GGUF_REPO).quant == "Q4_K_M"


_PULL_SCRIPT = textwrap.dedent(
    """
    import sys
    from nexa.hub import pull
    from nexa.store import ModelStore
    manifest = pull(ModelStore(sys.argv[1]), sys.argv[2])
    print("OK", manifest.name, manifest.quant, manifest.files[0].sha256)
    """
)


def test_killed_process_resumes_in_a_new_process(env, store, tmp_path):
    """The user's Ctrl-C / kill: a fresh process fetches only the bytes still missing."""
    big = tiny_gguf_bytes(pad_bytes=3_000_000, name="big")
    repo = "acme/Killed-GGUF"
    path = "Killed-Q4_K_M.gguf"
    stall = 1_234_567
    with HubServer({repo: {path: big, "README.md": b"hi"}}) as server:
        server.stall_at[(repo, path)] = stall
        child_env = {**os.environ, "HF_ENDPOINT": server.url}
        cmd = [sys.executable, "-c", _PULL_SCRIPT, str(store.home), repo]
        first = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        try:
            assert server.stalled.wait(60), "the first pull never reached the stall point"

            def stalled_part():
                parts = [p for p in leftover_partials(store) if p.name.endswith(".part")]
                return parts[0] if parts and parts[0].stat().st_size == stall else None

            wait_until(stalled_part, "the first pull has written the bytes it received")
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
            server.stall_at.clear()
            server.release()
        assert first.returncode == -signal.SIGKILL
        assert ModelStore(store.home).list() == []

        server.reset_counters()
        second = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert second.stdout.split() == ["OK", repo, "Q4_K_M", sha256(big)]
        assert server.range_starts[(repo, path)] == [stall]
        assert server.bytes_served[(repo, path)] == len(big) - stall

    manifest = ModelStore(store.home).get(repo)
    assert manifest.file_path("weights").read_bytes() == big
    assert leftover_partials(store) == []


# --- verification ----------------------------------------------------------------------


def test_lfs_file_with_wrong_bytes_is_rejected_and_nothing_is_visible(hub, store, ggufs):
    path = "Vision-Q4_K_M.gguf"
    hub.corrupt.add((GGUF_REPO, path))
    with pytest.raises(StoreError, match=f"{path} .*failed verification: expected sha256 "
                                         f"{sha256(ggufs[path])}"):
        pull(store, GGUF_REPO)
    assert store.list() == []
    assert not (store.models_dir / GGUF_REPO).exists()
    # The bad bytes are gone, so the next pull starts clean instead of resuming them.
    assert not any(p.name.endswith(".part") for p in leftover_partials(store))
    hub.corrupt.clear()
    hub.reset_counters()
    manifest = pull(store, GGUF_REPO)
    assert hub.range_starts[(GGUF_REPO, path)] == [0]
    assert manifest.file_path("weights").read_bytes() == ggufs[path]


def test_hashes_come_from_the_file_headers_when_the_listing_has_none(ggufs, env, store):
    with HubServer({GGUF_REPO: ggufs}, sibling_metadata=False) as server:
        env.setenv("HF_ENDPOINT", server.url)
        server.corrupt.add((GGUF_REPO, "mmproj-Vision-F16.gguf"))
        with pytest.raises(StoreError, match="mmproj-Vision-F16.gguf .*failed verification"):
            pull(store, GGUF_REPO)
        assert store.list() == []
        server.corrupt.clear()
        manifest = pull(store, GGUF_REPO)
        assert server.requests[("HEAD", GGUF_REPO, "Vision-Q4_K_M.gguf")] >= 1
    assert {f.path: f.sha256 for f in manifest.files} == {
        p: sha256(ggufs[p]) for p in ("Vision-Q4_K_M.gguf", "mmproj-Vision-F16.gguf")
    }


def test_small_git_file_with_wrong_bytes_is_rejected(env, store):
    repo = "acme/tiny-llama"
    files = {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
             "model.safetensors": b"\x00" * 64, "tokenizer.json": b"{}"}
    with HubServer({repo: files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        server.corrupt.add((repo, "config.json"))
        with pytest.raises(StoreError, match="config.json .*expected git blob sha1"):
            pull(store, repo)
        assert store.list() == []
        server.corrupt.clear()
        manifest = pull(store, repo)
    assert manifest.format == "safetensors"
    config = next(f for f in manifest.files if f.path == "config.json")
    assert config.sha256 == sha256(files["config.json"])


# --- other formats ---------------------------------------------------------------------


def test_diffusers_repo_takes_the_pipeline_components(env, store):
    repo = "acme/tiny-sd"
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": [None, None],
    }
    wanted = {
        "model_index.json": json.dumps(index).encode(),
        "unet/config.json": b'{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": b"unet" * 50,
        "vae/config.json": b"{}",
        "vae/diffusion_pytorch_model.safetensors": b"vae" * 50,
        "text_encoder/config.json": b"{}",
        "text_encoder/model.safetensors": b"te" * 50,
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges.txt": b"#version: 0.2\n",
        "tokenizer/tokenizer_config.json": b"{}",
        "tokenizer/special_tokens_map.json": b"{}",
        "scheduler/scheduler_config.json": b'{"steps_offset": 1}',
        "feature_extractor/preprocessor_config.json": b"{}",
    }
    unwanted = {
        "unet/diffusion_pytorch_model.fp16.safetensors": b"half" * 20,
        "unet/diffusion_pytorch_model.bin": b"pickle" * 20,
        "text_encoder/pytorch_model.bin": b"pickle" * 20,
        "text_encoder/flax_model.msgpack": b"flax" * 20,
        "safety_checker/model.safetensors": b"sc" * 20,  # null component
        "safety_checker/config.json": b"{}",
        "v1-5-pruned-emaonly.safetensors": b"single file" * 20,
        "onnx/unet/model.onnx": b"onnx" * 20,
        "README.md": b"# sd",
        "images/sample.png": b"png",
        ".gitattributes": b"*.safetensors filter=lfs",
    }
    with HubServer({repo: {**wanted, **unwanted}}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        manifest = pull(store, repo)
        fetched = {w.removeprefix("cdn:") for w in file_requests(server, repo)}
    assert manifest.format == "diffusers"
    assert manifest.tasks == {Task.IMAGE}
    assert {f.path for f in manifest.files} == set(wanted)
    # Files with identical bytes ("{}") are fetched once; nothing unwanted is fetched.
    assert fetched <= set(wanted) and not fetched & set(unwanted)
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert all((manifest.root / p).read_bytes() == data for p, data in wanted.items())
    assert all(f.sha256 == sha256(wanted[f.path]) for f in manifest.files)


def test_sentence_transformers_repo_skips_exports_and_duplicates(env, store):
    repo = "acme/mini-embed"
    wanted = {
        "modules.json": json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]).encode(),
        "config.json": json.dumps({"architectures": ["BertModel"]}).encode(),
        "config_sentence_transformers.json": b"{}",
        "sentence_bert_config.json": b'{"max_seq_length": 256}',
        "model.safetensors": b"weights" * 40,
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "vocab.txt": b"[PAD]\n[UNK]\n",
    }
    unwanted = {
        "pytorch_model.bin": b"pickle" * 40,
        "tf_model.h5": b"h5" * 40,
        "rust_model.ot": b"ot" * 40,
        "onnx/model.onnx": b"onnx" * 40,
        "onnx/model_quint8_avx2.onnx": b"onnx" * 10,
        "openvino/openvino_model.bin": b"ov" * 40,
        "openvino/openvino_model.xml": b"<xml/>",
        "train_script.py": b"import os; os.system('rm -rf ~')",
        "README.md": b"# embed",
        "training_args.bin": b"args",
    }
    with HubServer({repo: {**wanted, **unwanted}}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        manifest = pull(store, repo)
    assert manifest.format == "sentence-transformers"
    assert manifest.tasks == {Task.EMBED}
    assert {f.path for f in manifest.files} == set(wanted)


def test_mlx_repo_takes_config_tokenizer_and_weights(env, store):
    repo = "mlx-community/Tiny-Chat-4bit"
    wanted = {
        "config.json": json.dumps({"model_type": "llama", "quantization": {"bits": 4},
                                   "max_position_embeddings": 1024}).encode(),
        "model.safetensors": b"mlx" * 50,
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
        "generation_config.json": b"{}",
    }
    with HubServer({repo: {**wanted, "README.md": b"# mlx", ".gitattributes": b""}}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        manifest = pull(store, repo)
        with pytest.raises(StoreError, match="GGUF repos only"):
            pull(store, f"{repo}:Q4_K_M")
    assert manifest.format == "mlx"
    assert manifest.context_length == 1024
    assert {f.path for f in manifest.files} == set(wanted)


def test_repo_without_usable_weights_is_refused(env, store):
    with HubServer({"acme/onnx-only": {"config.json": b"{}", "onnx/model.onnx": b"x" * 10,
                                       "README.md": b"#"}}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(StoreError, match="no weights nexa can use"):
            pull(store, "acme/onnx-only")
    assert store.list() == []


# --- hostile or broken hubs ------------------------------------------------------------


@pytest.mark.parametrize(
    "evil",
    ["../escape.gguf", "/tmp/absolute.gguf", "sub/../../escape.gguf", "sub\\..\\..\\x.gguf",
     "ok/./x.gguf", "nul\x00byte.gguf", "C:/windows.gguf", "line\nbreak.json"],
)
def test_malicious_file_names_refuse_the_pull(env, store, tmp_path, evil):
    repo = "evil/Repo-GGUF"
    files = {"good-Q4_K_M.gguf": tiny_gguf_bytes(), evil: tiny_gguf_bytes(pad_bytes=8)}
    with HubServer({repo: files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(StoreError, match="unsafe name"):
            pull(store, repo)
        assert file_requests(server, repo) == set()  # refused before downloading anything
    assert store.list() == []
    assert not (tmp_path / "escape.gguf").exists()
    assert not Path("/tmp/absolute.gguf").exists()


def test_repo_manifest_json_cannot_replace_the_store_manifest(env, store):
    repo = "acme/sneaky"
    files = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
             "model.safetensors": b"w" * 32,
             "manifest.json": json.dumps({"name": "other/model", "format": "gguf"}).encode()}
    with HubServer({repo: files}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        manifest = pull(store, repo)
    assert "manifest.json" not in {f.path for f in manifest.files}
    assert store.get(repo).name == repo


def test_unknown_repo_and_bad_names_are_clear_errors(hub, store):
    with pytest.raises(StoreError, match="no model repo 'acme/nothing'"):
        pull(store, "acme/nothing")
    with pytest.raises(StoreError, match="invalid model name"):
        pull(store, "../../etc")
    with pytest.raises(StoreError, match="invalid quant"):
        pull(store, f"{GGUF_REPO}:../x")


def test_unreachable_hub_is_a_clear_error(env, store):
    with HubServer({}) as server:
        url = server.url
    with pytest.raises(StoreError, match="cannot reach the hub"):
        pull(store, GGUF_REPO, endpoint=url)


def test_endpoint_argument_and_token(ggufs, env, store):
    """``endpoint=`` wins over HF_ENDPOINT; HF_TOKEN goes to the hub but not to the CDN."""
    env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    env.setenv("HF_TOKEN", "hf_test_token")
    from huggingface_hub import constants

    # huggingface_hub reads this switch once at import; the test needs implicit tokens on.
    env.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    with HubServer({GGUF_REPO: ggufs}) as server:
        manifest = pull(store, f"hf.co/{GGUF_REPO}:Q8_0", endpoint=server.url)
        auth = server.auth_headers
    assert manifest.quant == "Q8_0"
    api = [a for p, a in auth if p.startswith("/api/")]
    cdn = [a for p, a in auth if p.startswith("/cdn/")]
    assert api == ["Bearer hf_test_token"]
    assert cdn and all(a is None for a in cdn)


def test_cli_pull_from_the_hub(hub, home, ggufs):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from nexa.cli import main; sys.exit(main())",
         "pull", f"{GGUF_REPO}:Q8_0", "--quiet"],
        env={**os.environ, "NEXA_HOME": str(home)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"pulled {GGUF_REPO}" in result.stdout
    assert ModelStore(home).get(GGUF_REPO).quant == "Q8_0"


# --- the loopback hub speaks the protocol huggingface_hub expects -----------------------


def test_hubserver_serves_huggingface_hub_own_calls(ggufs, env, tmp_path):
    """The test double is checked against the client's own downloader and tree listing.

    It also pins why ``nexa.hub`` verifies hashes itself: ``hf_hub_download`` stores a
    corrupted LFS file without complaint.
    """
    from huggingface_hub import HfApi, hf_hub_download

    with HubServer({GGUF_REPO: ggufs}) as server:
        api = HfApi(endpoint=server.url)
        tree = {e.path: e for e in api.list_repo_tree(GGUF_REPO, recursive=True)}
        assert set(tree) == set(ggufs)
        assert tree["Vision-F16.gguf"].lfs.sha256 == sha256(ggufs["Vision-F16.gguf"])
        assert tree["README.md"].lfs is None
        readme = hf_hub_download(GGUF_REPO, "README.md", endpoint=server.url,
                                 cache_dir=tmp_path / "cache")
        assert Path(readme).read_bytes() == ggufs["README.md"]
        server.corrupt.add((GGUF_REPO, "Vision-F16.gguf"))
        weights = hf_hub_download(GGUF_REPO, "Vision-F16.gguf", endpoint=server.url,
                                  cache_dir=tmp_path / "cache")
        assert Path(weights).stat().st_size == len(ggufs["Vision-F16.gguf"])
        assert Path(weights).read_bytes() != ggufs["Vision-F16.gguf"]
