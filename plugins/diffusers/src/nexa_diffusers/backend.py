"""The diffusers image backend: text-to-image with Hugging Face diffusers pipelines.

This module owns loading a diffusers model (a ``model_index.json`` folder through
``AutoPipelineForText2Image``, or a single ``.safetensors``/``.ckpt`` checkpoint through
the matching pipeline's ``from_single_file``), checking a request against the loaded
pipeline's limits, running it with per-image seeded generators, reporting step progress
to the ``nexa.diffusers`` logger, and stopping between steps when the request is
cancelled. torch and diffusers are imported only inside ``load`` and the methods, so the
plugin's entry point imports fast.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any, ClassVar

import attrs

from nexa.backend import Backend, CancelToken
from nexa.errors import BadRequest, Cancelled, ModelLoadError
from nexa.types import Device, ImageRequest, ImageResult, Manifest, Task

logger = logging.getLogger("nexa.diffusers")

# A name or variant built for NVIDIA only, such as the seed's
# `NexaAI/Prefect-illustrious-XL-v2.0p-fp16-cuda`: "cuda" as a whole dash/underscore token.
_CUDA_ONLY_RE = re.compile(r"(?:^|[-_./])cuda(?:$|[-_./])", re.IGNORECASE)

# Single-file checkpoints carry only weights; diffusers needs the component configs of
# the model family (normally fetched from the hub, which nexa never reaches at run time).
_SINGLE_FILE_PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

MIN_SIDE = 64
DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_STEPS = 500


def cuda_only_reason(manifest: Manifest) -> str | None:
    """Why ``manifest`` names a CUDA-only build, or None when it doesn't."""
    requires = str(manifest.options.get("requires", "") or "").lower()
    if requires == "cuda":
        return "its manifest says it requires CUDA (options.requires = 'cuda')"
    for label, value in (("name", manifest.name), ("variant", manifest.options.get("variant"))):
        if value and _CUDA_ONLY_RE.search(str(value)):
            return f"its {label} {value!r} marks a build for NVIDIA CUDA GPUs"
    return None


def torch_device_and_dtype(device: Device, override: str | None = None) -> tuple[str, str]:
    """The torch device string and dtype name for a nexa device (cuda fp16, mps fp16, cpu fp32)."""
    if device.kind == "cuda":
        place, dtype = "cuda", "float16"
    elif device.kind == "metal":
        place, dtype = "mps", "float16"
    else:
        # fp16 on CPU is slow and some kernels lack it; bf16 changes images. fp32 is the
        # reference everywhere else compares against.
        place, dtype = "cpu", "float32"
    if override:
        if override not in {"float32", "float16", "bfloat16"}:
            raise ModelLoadError(f"unknown dtype {override!r}; use float32, float16 or bfloat16")
        dtype = override
    return place, dtype


class DiffusersBackend(Backend):
    """Text-to-image with a diffusers pipeline; one request at a time per loaded model."""

    name: ClassVar[str] = "diffusers"
    tasks: ClassVar[frozenset[Task]] = frozenset({Task.IMAGE})
    formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "diffusers-single-file"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "metal"})
    # A pipeline object keeps per-call state (its scheduler's timesteps, `_interrupt`),
    # so two requests must never run on it at once.
    parallel = 1
    priority: ClassVar[int] = 0

    @classmethod
    def supports(cls, manifest: Manifest, device: Device) -> str | None:
        if device.kind != "cuda":
            why = cuda_only_reason(manifest)
            if why is not None:
                return (
                    f"model {manifest.name!r} is built for CUDA (NVIDIA GPUs) only: {why}; "
                    f"this server runs on {device.kind}. Use a model made for this hardware "
                    "(a plain fp32/fp16 diffusers model on CPU or Apple Silicon)"
                )
        if manifest.format == "diffusers-single-file":
            if not any(f.path.lower().endswith((".safetensors", ".ckpt")) for f in manifest.files):
                return "no .safetensors or .ckpt checkpoint among the model's files"
        return None

    def __init__(self, manifest: Manifest, device: Device, options: Any = None):
        super().__init__(manifest, device, options)
        self.pipe: Any = None
        self.size_step = 8
        self.max_side = int(self.options.extra.get("max_image_side", DEFAULT_MAX_SIDE))
        self.max_pixels = int(self.options.extra.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        dtype = self.options.extra.get("dtype") or manifest.options.get("dtype")
        self.torch_device, self.dtype_name = torch_device_and_dtype(device, dtype)

    # --- loading ---------------------------------------------------------------------

    def load(self) -> None:
        # The registry already asked supports(); a direct caller (or a pin) may not have.
        if self.device.kind != "cuda" and (why := cuda_only_reason(self.manifest)):
            raise ModelLoadError(
                f"model {self.manifest.name!r} is built for CUDA (NVIDIA GPUs) only ({why}); "
                f"it cannot run on {self.device.kind}"
            )
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # tqdm bars from a server's worker thread only garble its log; progress is
        # reported per step to the `nexa.diffusers` logger instead.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        dtype = getattr(torch, self.dtype_name)
        started = time.monotonic()
        try:
            if self.manifest.format == "diffusers-single-file":
                pipe = self._load_single_file(dtype)
            else:
                pipe = self._load_folder(dtype)
            pipe = pipe.to(self.torch_device)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"could not load diffusers model {self.manifest.name!r}: "
                f"{type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        if "Flux" in type(pipe).__name__:
            # Flux packs 2x2 latent patches: sides must be multiples of vae_scale_factor * 2.
            self.size_step = max(16, int(getattr(pipe, "vae_scale_factor", 8)) * 2)
        self.pipe = pipe
        logger.info(
            "loaded %s (%s) as %s on %s/%s in %.1fs",
            self.manifest.name, self.manifest.format, type(pipe).__name__,
            self.torch_device, self.dtype_name, time.monotonic() - started,
        )

    def _root(self) -> Path:
        if self.manifest.root is None:
            raise ModelLoadError(f"model {self.manifest.name!r} has no folder on disk")
        return Path(self.manifest.root)

    def _load_folder(self, dtype: Any) -> Any:
        from diffusers import AutoPipelineForText2Image

        root = self._root()
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        variant = self._variant()
        if variant:
            kwargs["variant"] = variant
        try:
            return AutoPipelineForText2Image.from_pretrained(str(root), **kwargs)
        except ValueError as exc:
            if "AutoPipeline can't find a pipeline" in str(exc):
                raise ModelLoadError(
                    f"model {self.manifest.name!r} is a diffusers pipeline that does not "
                    f"generate images from text: {exc}"
                ) from exc
            raise

    def _variant(self) -> str | None:
        """``fp16`` when the folder only has fp16-variant weights (``*.fp16.safetensors``)."""
        explicit = self.manifest.options.get("variant")
        if explicit and not _CUDA_ONLY_RE.search(str(explicit)):
            return str(explicit)
        weights = [f.path for f in self.manifest.files if f.role == "weights"]
        plain = [w for w in weights if ".fp16." not in w]
        if weights and not plain:
            return "fp16"
        return None

    def _load_single_file(self, dtype: Any) -> Any:
        import diffusers
        from diffusers.loaders.single_file_utils import (
            DIFFUSERS_DEFAULT_PIPELINE_PATHS,
            infer_diffusers_model_type,
        )

        root = self._root()
        checkpoint_file = next(
            root / f.path for f in self.manifest.files
            if f.path.lower().endswith((".safetensors", ".ckpt"))
        )
        model_type = infer_diffusers_model_type(self._checkpoint_shapes(checkpoint_file))
        class_name = self.manifest.options.get("pipeline") or _SINGLE_FILE_PIPELINES.get(model_type)
        if class_name is None or not hasattr(diffusers, class_name):
            raise ModelLoadError(
                f"{checkpoint_file.name} looks like a {model_type!r} checkpoint, which nexa "
                "cannot serve for text-to-image; convert it to a diffusers folder"
            )
        config = self._single_file_config(model_type, DIFFUSERS_DEFAULT_PIPELINE_PATHS)
        pipeline_cls = getattr(diffusers, class_name)
        return pipeline_cls.from_single_file(
            str(checkpoint_file), config=config, dtype=dtype, local_files_only=True
        )

    @staticmethod
    def _checkpoint_shapes(path: Path) -> Any:
        """The checkpoint's tensors, as shapes only where the format allows (safetensors)."""
        if path.suffix.lower() != ".safetensors":
            from diffusers.loaders.single_file_utils import load_single_file_checkpoint

            return load_single_file_checkpoint(str(path), local_files_only=True)
        import torch
        from safetensors import safe_open

        # Meta tensors: model-family detection reads keys and shapes, never the data,
        # so a multi-GB file is not read twice.
        with safe_open(str(path), framework="pt") as fh:
            return {
                key: torch.empty(fh.get_slice(key).get_shape(), device="meta")
                for key in fh.keys()
            }

    def _single_file_config(self, model_type: str, defaults: dict[str, Any]) -> str:
        """A local folder or cached hub repo holding the component configs; never a download."""
        configured = self.manifest.options.get("config")
        if configured:
            path = Path(str(configured))
            if not path.is_absolute():
                path = self._root() / path
            if path.is_dir():
                return str(path)
            if _REPO_ID_RE.match(str(configured)) and self._cached(str(configured)):
                return str(configured)
            raise ModelLoadError(
                f"model {self.manifest.name!r}: options.config {configured!r} is neither a "
                "folder nor a hub repo in the local cache"
            )
        # A diffusers config folder shipped beside the checkpoint (`model.safetensors` +
        # `config/model_index.json`, ...) needs no manifest edit.
        beside = sorted(p.parent for p in self._root().glob("*/model_index.json"))
        if beside:
            return str(beside[0])
        repo = defaults.get(model_type, {}).get("pretrained_model_name_or_path")
        if repo and self._cached(repo):
            return repo
        raise ModelLoadError(
            f"single-file checkpoint {self.manifest.name!r} ({model_type}) needs the component "
            f"configs of {repo or 'its model family'}, which are not available offline; put "
            "that family's diffusers config folder (model_index.json and the component "
            "configs) beside the checkpoint, or set options.config in the model's manifest to "
            "a local diffusers folder of the same family"
        )

    @staticmethod
    def _cached(repo: str) -> bool:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json")
        return isinstance(found, str)

    def close(self) -> None:
        pipe, self.pipe = self.pipe, None
        del pipe
        if self.torch_device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- generation ------------------------------------------------------------------

    def native_size(self) -> int:
        """The side the pipeline was trained at (512 for SD 1.x, 1024 for SDXL and Flux)."""
        pipe = self.pipe
        scale = getattr(pipe, "vae_scale_factor", 8) or 8
        sample = getattr(pipe, "default_sample_size", None)
        if sample is None:
            unet = getattr(pipe, "unet", None)
            sample = getattr(getattr(unet, "config", None), "sample_size", None)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        return int(sample * scale) if isinstance(sample, int) else 512

    def resolve_size(self, request: ImageRequest) -> ImageRequest:
        """A request with no size gets the model's native resolution."""
        if request.width is not None and request.height is not None:
            return request
        side = self.native_size()
        return attrs.evolve(request, width=request.width or side, height=request.height or side)

    def check_request(self, request: ImageRequest) -> None:
        """Refuse what the loaded pipeline cannot do, before any work starts."""
        w, h, step = request.width, request.height, self.size_step
        size = f"{w}x{h}"
        if w % step or h % step:
            raise BadRequest(
                f"size {size}: width and height must be multiples of {step} for this model",
                param="size",
            )
        if min(w, h) < MIN_SIDE or max(w, h) > self.max_side:
            raise BadRequest(
                f"size {size}: each side must be between {MIN_SIDE} and {self.max_side} pixels",
                param="size",
            )
        if w * h > self.max_pixels:
            raise BadRequest(
                f"size {size} is {w * h} pixels; this model allows at most {self.max_pixels}",
                param="size",
            )
        if request.n < 1:
            raise BadRequest("n must be at least 1", param="n")
        if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
            raise BadRequest(
                f"num_inference_steps must be between 1 and {MAX_STEPS}",
                param="num_inference_steps",
            )
        if request.guidance_scale is not None and request.guidance_scale < 0:
            raise BadRequest("guidance_scale must not be negative", param="guidance_scale")
        if not request.prompt.strip():
            raise BadRequest("prompt must not be empty", param="prompt")

    def generate_images(self, request: ImageRequest, cancel: CancelToken) -> ImageResult:
        if self.pipe is None:
            raise ModelLoadError(f"model {self.manifest.name!r} is not loaded")
        request = self.resolve_size(request)
        self.check_request(request)
        cancel.raise_if_cancelled()
        import torch

        pipe = self.pipe
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        # One generator per image, seeded seed+i: the images of one request differ and the
        # same (seed, n) gives the same bytes. CPU generators make the starting noise the
        # same whatever device runs the model.
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.n)]
        kwargs: dict[str, Any] = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "num_images_per_prompt": request.n,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": self._step_callback(request, cancel),
        }
        if request.steps is not None:
            kwargs["num_inference_steps"] = request.steps
        if request.guidance_scale is not None:
            kwargs["guidance_scale"] = request.guidance_scale
        if request.negative_prompt:
            kwargs["negative_prompt"] = request.negative_prompt
        started = time.monotonic()
        logger.info(
            "generating %d image(s) %dx%d with %s, seed %d",
            request.n, request.width, request.height, self.manifest.name, seed,
        )
        try:
            with torch.inference_mode():
                output = pipe(**kwargs)
        except Cancelled:
            logger.info("image generation for %s cancelled", self.manifest.name)
            raise
        finally:
            # Pipelines that honour `_interrupt` keep it until their next call resets it.
            pipe._interrupt = False
        cancel.raise_if_cancelled()
        images = []
        for image in output.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append(buffer.getvalue())
        logger.info(
            "generated %d image(s) with %s in %.2fs", len(images), self.manifest.name,
            time.monotonic() - started,
        )
        return ImageResult(images=tuple(images), seed=seed)

    def _step_callback(self, request: ImageRequest, cancel: CancelToken) -> Any:
        name = self.manifest.name

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            total = getattr(pipe, "num_timesteps", None) or request.steps or "?"
            logger.info("%s: step %d/%s", name, step + 1, total)
            if cancel.cancelled:
                # Raising stops at once, before the remaining steps and the VAE decode;
                # `_interrupt` is only honoured by some pipelines, and only skips steps.
                pipe._interrupt = True
                raise Cancelled()
            return callback_kwargs

        return on_step_end
