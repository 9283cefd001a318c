"""The diffusers backend driven directly (load, generate_images), on a tiny random pipeline."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import attrs
import pytest
from PIL import Image
from tiny_pipeline import import_copy, write_tiny_single_file

from nexa.backend import CancelToken
from nexa.errors import BadRequest, Cancelled, ModelLoadError, NoBackend
from nexa.plugins import load_plugins
from nexa.registry import BackendRegistry
from nexa.store import ModelStore
from nexa.testing import StaticPlugin, conformance
from nexa.types import Device, ImageRequest, Manifest, Task
from nexa_diffusers.backend import DiffusersBackend

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = Device("cpu")
SEED_MODEL = "NexaAI/Prefect-illustrious-XL-v2.0p-fp16-cuda"


def request(**kwargs) -> ImageRequest:
    fields = {"prompt": "a red cat", "n": 1, "width": 64, "height": 64, "seed": 1, "steps": 2}
    return ImageRequest(**{**fields, **kwargs})


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


def test_store_import_describes_a_diffusers_model(tiny_manifest: Manifest) -> None:
    assert tiny_manifest.format == "diffusers"
    assert tiny_manifest.tasks == {Task.IMAGE}
    assert DiffusersBackend.supports(tiny_manifest, CPU) is None


def test_png_of_the_requested_size(loaded_backend: DiffusersBackend) -> None:
    result = loaded_backend.generate_images(request(width=64, height=128), CancelToken())
    assert len(result.images) == 1
    assert png_size(result.images[0]) == (64, 128)
    assert result.seed == 1


def test_n_images_differ_from_one_another(loaded_backend: DiffusersBackend) -> None:
    result = loaded_backend.generate_images(request(n=2, seed=5), CancelToken())
    assert len(result.images) == 2
    assert [png_size(p) for p in result.images] == [(64, 64), (64, 64)]
    assert result.images[0] != result.images[1]


def test_same_seed_same_bytes_other_seed_other_image(loaded_backend: DiffusersBackend) -> None:
    first = loaded_backend.generate_images(request(seed=42), CancelToken())
    again = loaded_backend.generate_images(request(seed=42), CancelToken())
    other = loaded_backend.generate_images(request(seed=43), CancelToken())
    assert first.images == again.images
    assert other.images != first.images


def test_without_seed_the_chosen_seed_reproduces_the_image(loaded_backend: DiffusersBackend) -> None:
    result = loaded_backend.generate_images(request(seed=None), CancelToken())
    assert isinstance(result.seed, int)
    again = loaded_backend.generate_images(request(seed=result.seed), CancelToken())
    assert again.images == result.images


@pytest.mark.parametrize(
    ("width", "height", "words"),
    [
        (65, 64, "multiples of 8"),
        (64, 100, "multiples of 8"),
        (32, 32, "between 64"),
        (4096, 64, "between 64"),
    ],
)
def test_bad_size_is_a_bad_request(
    loaded_backend: DiffusersBackend, width: int, height: int, words: str, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="nexa.diffusers"), pytest.raises(BadRequest) as err:
        loaded_backend.generate_images(request(width=width, height=height), CancelToken())
    assert err.value.param == "size" and err.value.status == 400
    assert words in err.value.message and f"{width}x{height}" in err.value.message
    # Refused before any work started.
    assert not [r for r in caplog.records if "step" in r.getMessage()]


def test_pixel_cap_is_configurable(tiny_manifest: Manifest) -> None:
    from nexa.backend import LoadOptions

    small = DiffusersBackend(tiny_manifest, CPU, LoadOptions(extra={"max_image_pixels": 64 * 64}))
    small.check_request(request(width=64, height=64))
    with pytest.raises(BadRequest, match="at most 4096") as err:
        small.check_request(request(width=64, height=128))
    assert err.value.param == "size"


def test_steps_are_logged_and_cancel_stops_between_steps(
    loaded_backend: DiffusersBackend,
) -> None:
    steps_seen: list[str] = []
    first_step = threading.Event()

    class StepWatcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if ": step " in record.getMessage():
                steps_seen.append(record.getMessage())
                first_step.set()

    watcher = StepWatcher(level=logging.INFO)
    log = logging.getLogger("nexa.diffusers")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(watcher)
    cancel = CancelToken()

    def cancel_after_first_step() -> None:
        first_step.wait(timeout=120)
        cancel.cancel()

    canceller = threading.Thread(target=cancel_after_first_step)
    canceller.start()
    try:
        with pytest.raises(Cancelled):
            loaded_backend.generate_images(request(steps=40), cancel)
        canceller.join()
        assert steps_seen and steps_seen[0].endswith("step 1/40")
        assert len(steps_seen) < 40, "generation ran to the end despite the cancel"

        # The pipeline is usable again afterwards and runs every step.
        steps_seen.clear()
        result = loaded_backend.generate_images(request(steps=3), CancelToken())
        assert len(result.images) == 1
        assert steps_seen == [f"test/tiny-sd: step {i}/3" for i in (1, 2, 3)]
    finally:
        log.removeHandler(watcher)
        log.setLevel(old_level)


def test_cancelled_before_start_does_no_work(loaded_backend: DiffusersBackend) -> None:
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        loaded_backend.generate_images(request(), cancel)


def test_conformance(loaded_backend: DiffusersBackend) -> None:
    conformance.check_images(loaded_backend)


# --- hardware-specific models -----------------------------------------------------


def test_cuda_only_model_is_refused_on_cpu_with_a_clear_reason(
    tiny_store: ModelStore, tiny_sd_folder: Path, tmp_path: Path
) -> None:
    manifest = import_copy(tiny_store, tiny_sd_folder, SEED_MODEL, tmp_path)
    reason = DiffusersBackend.supports(manifest, CPU)
    assert reason is not None
    assert "CUDA" in reason and "cpu" in reason and SEED_MODEL in reason
    assert DiffusersBackend.supports(manifest, Device("metal")) is not None
    assert DiffusersBackend.supports(manifest, Device("cuda")) is None

    # Through the core's backend selection, as the server does it: NoBackend (400).
    plugins = load_plugins(load_entry_points=False, extra_plugins=[StaticPlugin([DiffusersBackend])])
    registry = BackendRegistry(plugins)
    with pytest.raises(NoBackend, match="built for CUDA") as err:
        registry.select(Task.IMAGE, manifest, CPU)
    assert err.value.status == 400
    assert registry.select(Task.IMAGE, manifest, Device("cuda")) is DiffusersBackend

    # Forced past selection (a pin, a direct caller), load fails fast and says why.
    with pytest.raises(ModelLoadError, match="built for CUDA"):
        DiffusersBackend(manifest, CPU).load()


@pytest.mark.parametrize(
    "options",
    [{"requires": "cuda"}, {"variant": "fp16-cuda"}],
)
def test_manifest_options_can_mark_a_model_cuda_only(
    tiny_manifest: Manifest, options: dict
) -> None:
    marked = attrs.evolve(tiny_manifest, options=options)
    assert "CUDA" in (DiffusersBackend.supports(marked, CPU) or "")
    assert DiffusersBackend.supports(marked, Device("cuda")) is None


def test_names_that_merely_contain_cuda_letters_are_not_refused(tiny_manifest: Manifest) -> None:
    for name in ("acme/barracuda-xl", "acme/sd-fp16", "acme/cudart-free"):
        assert DiffusersBackend.supports(attrs.evolve(tiny_manifest, name=name), CPU) is None


# --- single-file checkpoints --------------------------------------------------------


def test_single_file_without_configs_fails_clearly_and_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    # An SD1-style key, so diffusers recognises the family (v1) from the header alone.
    ckpt = tmp_path / "my-model.safetensors"
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(ckpt)
    )
    store = ModelStore(tmp_path / "home")
    manifest = store.import_path(ckpt, name="local/my-model")
    assert manifest.format == "diffusers-single-file"
    assert DiffusersBackend.supports(manifest, CPU) is None
    with pytest.raises(ModelLoadError) as err:
        DiffusersBackend(manifest, CPU).load()
    message = err.value.message
    assert "stable-diffusion-v1-5" in message and "options.config" in message


def _copy_configs(source: Path, target: Path) -> None:
    """The folder's JSON configs and tokenizer, no weights: what a family's config repo holds."""
    for path in source.rglob("*.json"):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


def test_single_file_with_configs_beside_it_equals_the_folder_model(
    tmp_path: Path, tiny_sd_folder: Path, loaded_backend: DiffusersBackend
) -> None:
    # An original-format (LDM) checkpoint of the same weights, plus the family's config
    # folder beside it: imported as a user would, loaded through from_single_file.
    user = tmp_path / "my-checkpoint"
    user.mkdir()
    write_tiny_single_file(tiny_sd_folder, user / "tiny-sd.safetensors")
    _copy_configs(tiny_sd_folder, user / "config")
    store = ModelStore(tmp_path / "home")
    manifest = store.import_path(user, name="local/tiny-single")
    assert manifest.format == "diffusers-single-file" and manifest.tasks == {Task.IMAGE}
    backend = DiffusersBackend(manifest, CPU)
    backend.load()
    try:
        single = backend.generate_images(request(seed=21), CancelToken())
        folder = loaded_backend.generate_images(request(seed=21), CancelToken())
        assert png_size(single.images[0]) == (64, 64)
        assert single.images == folder.images
    finally:
        backend.close()


def test_single_file_config_named_in_the_manifest(
    tmp_path: Path, tiny_sd_folder: Path, tiny_manifest: Manifest
) -> None:
    ckpt = write_tiny_single_file(tiny_sd_folder, tmp_path / "alone.safetensors")
    store = ModelStore(tmp_path / "home")
    manifest = store.import_path(ckpt, name="local/alone")
    # The user points the manifest at a diffusers model of the same family already in a store.
    path = store.model_dir(manifest.name) / "manifest.json"
    data = json.loads(path.read_text())
    data["options"] = {"config": str(tiny_manifest.root)}
    path.write_text(json.dumps(data))
    manifest = store.get("local/alone")
    backend = DiffusersBackend(manifest, CPU)
    backend.load()
    try:
        assert png_size(backend.generate_images(request(), CancelToken()).images[0]) == (64, 64)
    finally:
        backend.close()
    data["options"] = {"config": str(tmp_path / "missing")}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="options.config"):
        DiffusersBackend(store.get("local/alone"), CPU).load()


# --- packaging ----------------------------------------------------------------------


def test_entry_point_module_imports_without_torch() -> None:
    code = (
        "import sys, nexa_diffusers.plugin, nexa_diffusers.backend\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_entry_point_registers_the_backend() -> None:
    plugins = load_plugins(load_entry_points=True)
    assert "diffusers" in plugins.loaded, plugins.failures
    assert (DiffusersBackend, "diffusers") in plugins.backends[Task.IMAGE]


# --- accelerators (skipped where the hardware is absent) ---------------------------


def _accelerator_available(kind: str) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    return torch.backends.mps.is_available()


@pytest.mark.parametrize("kind", [pytest.param("cuda", marks=pytest.mark.cuda),
                                  pytest.param("metal", marks=pytest.mark.metal)])
def test_accelerator_generates_in_fp16_reproducibly(tiny_manifest: Manifest, kind: str) -> None:
    if not _accelerator_available(kind):
        pytest.skip(f"needs a {kind} device (torch sees none here)")
    backend = DiffusersBackend(tiny_manifest, Device(kind))
    assert backend.dtype_name == "float16"
    backend.load()
    try:
        first = backend.generate_images(request(n=2, seed=9), CancelToken())
        again = backend.generate_images(request(n=2, seed=9), CancelToken())
        assert [png_size(p) for p in first.images] == [(64, 64), (64, 64)]
        assert first.images[0] != first.images[1]
        assert first.images == again.images
    finally:
        backend.close()


def test_no_size_means_the_native_resolution(loaded_backend):
    from nexa.types import ImageRequest

    pipe = loaded_backend.pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert loaded_backend.native_size() == native
    request = loaded_backend.resolve_size(ImageRequest(prompt="a cat"))
    assert (request.width, request.height) == (native, native)
    explicit = loaded_backend.resolve_size(ImageRequest(prompt="a cat", width=64, height=128))
    assert (explicit.width, explicit.height) == (64, 128)
