"""Registry: each model key → where it loads from and which engine loads it.

Which capabilities use a model is declared by the capabilities (``Capability.model_keys``).

Sources default to a Hugging Face repo id + revision. They are overridden, in order, by
``[models.<key>]`` in ``<data-dir>/paletta.toml`` (``path``, ``repo``, ``revision``) and by the
environment variable ``PALETTA_MODEL_<KEY>`` (a local folder or file). Under the ``tiny``
profile every source is ``<data-dir>/models/tiny/<key>``, built on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from paletta_server.config import Config
from paletta_server.models.profiles import PROFILES, Profile
from paletta_server.models.types import ModelSource


@dataclass(frozen=True)
class ModelSpec:
    key: str
    repo: str
    # "module:function" in paletta_server.engines that loads it: fn(source, LoadContext) -> object.
    loader: str
    # "module:function" in paletta_server.engines.tiny that writes a tiny random-weight build to a folder.
    tiny_builder: str
    revision: str = "main"
    # File inside the repo, for single-file models (ESRGAN .pth, ONNX, LoRA safetensors).
    filename: str = ""
    # Rough resident size under NF4/bf16, used to make room before the first load.
    estimated_bytes: int = 0


GB = 1024**3
_E = "paletta_server.engines"
_T = "paletta_server.engines.tiny"

SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("flux-schnell", "black-forest-labs/FLUX.1-schnell",
              f"{_E}.flux:load_flux", f"{_T}.flux:build_schnell", estimated_bytes=12 * GB),
    ModelSpec("flux-kontext", "black-forest-labs/FLUX.1-Kontext-dev",
              f"{_E}.flux_edit:load_kontext", f"{_T}.flux_family:build_kontext", estimated_bytes=12 * GB),
    ModelSpec("flux-fill", "black-forest-labs/FLUX.1-Fill-dev",
              f"{_E}.flux_edit:load_fill", f"{_T}.flux_family:build_fill", estimated_bytes=12 * GB),
    ModelSpec("flux-controlnet-union", "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro",
              f"{_E}.control:load_control", f"{_T}.flux_family:build_control", estimated_bytes=14 * GB),
    ModelSpec("flux-dev", "black-forest-labs/FLUX.1-dev",
              f"{_E}.control:load_dev_source", f"{_T}.flux_family:build_dev", estimated_bytes=0),
    ModelSpec("ip-adapter", "XLabs-AI/flux-ip-adapter",
              f"{_E}.ip_adapter:load_ip_adapter", f"{_T}.flux_family:build_ip_adapter",
              filename="ip_adapter.safetensors", estimated_bytes=1 * GB),
    ModelSpec("clip-vit-large", "openai/clip-vit-large-patch14",
              f"{_E}.ip_adapter:load_image_encoder", f"{_T}.flux_family:build_image_encoder", estimated_bytes=1 * GB),
    ModelSpec("hyper-sd", "ByteDance/Hyper-SD",
              f"{_E}.styles:load_lora_source", f"{_T}.flux_family:build_lora",
              filename="Hyper-FLUX.1-dev-8steps-lora.safetensors", estimated_bytes=int(1.4 * GB)),
    ModelSpec("qwen-image-edit", "Qwen/Qwen-Image-Edit",
              f"{_E}.qwen:load_qwen_edit", f"{_T}.qwen:build_qwen_edit", estimated_bytes=20 * GB),
    # xinntao's RealESRGAN_x4plus is a GitHub release asset, not a Hub repo: the loader fetches the URL.
    ModelSpec("realesrgan-x4plus",
              "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
              f"{_E}.upscale:load_realesrgan", f"{_T}.vision:build_realesrgan", revision="",
              filename="RealESRGAN_x4plus.pth", estimated_bytes=70 * 1024**2),
    ModelSpec("birefnet-general", "rembg/birefnet-general",
              f"{_E}.background:load_birefnet", f"{_T}.vision:build_birefnet",
              filename="birefnet-general.onnx", estimated_bytes=0),
    ModelSpec("clipseg", "CIDAS/clipseg-rd64-refined",
              f"{_E}.segment:load_clipseg", f"{_T}.vision:build_clipseg", estimated_bytes=600 * 1024**2),
    ModelSpec("detr-resnet-50", "facebook/detr-resnet-50",
              f"{_E}.detect:load_detr", f"{_T}.vision:build_detr", estimated_bytes=170 * 1024**2),
    ModelSpec("owlv2", "google/owlv2-base-patch16-ensemble",
              f"{_E}.detect:load_owlv2", f"{_T}.vision:build_owlv2", estimated_bytes=600 * 1024**2),
    ModelSpec("blip-large", "Salesforce/blip-image-captioning-large",
              f"{_E}.caption:load_blip", f"{_T}.vision:build_blip", estimated_bytes=1 * GB),
    ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b",
              f"{_E}.caption:load_blip2", f"{_T}.vision:build_blip2", estimated_bytes=6 * GB),
    ModelSpec("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct",
              f"{_E}.prompt:load_qwen_llm", f"{_T}.vision:build_qwen_llm", estimated_bytes=3 * GB),
    # Identity (PuLID-FLUX v0.9.1): a FLUX.1-dev FluxPipeline (built on the flux-dev source), the PuLID
    # IDFormer + CA weights, InsightFace antelopev2 (detector + ArcFace), EVA02-CLIP-L-14-336, BiSeNet parsing.
    ModelSpec("flux-dev-pipeline", "black-forest-labs/FLUX.1-dev",
              f"{_E}.pulid:load_dev_pipeline", f"{_T}.identity:build_dev_pipeline", estimated_bytes=12 * GB),
    ModelSpec("pulid-flux", "guozinan/PuLID",
              f"{_E}.pulid:load_pulid", f"{_T}.identity:build_pulid",
              filename="pulid_flux_v0.9.1.safetensors", estimated_bytes=1200 * 1024**2),
    ModelSpec("antelopev2", "DIAMONIK7777/antelopev2",
              f"{_E}.faces:load_face_analysis", f"{_T}.identity:build_antelopev2", estimated_bytes=300 * 1024**2),
    ModelSpec("eva02-clip-l-336", "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k",
              f"{_E}.pulid:load_eva", f"{_T}.identity:build_eva",
              filename="open_clip_model.safetensors", estimated_bytes=700 * 1024**2),
    ModelSpec("facexlib-parsing", "xinntao/facexlib",
              f"{_E}.faces:load_face_parser", f"{_T}.identity:build_face_parser",
              filename="parsing_bisenet.safetensors", estimated_bytes=60 * 1024**2),
)


def env_var(key: str) -> str:
    return "PALETTA_MODEL_" + key.upper().replace("-", "_").replace(".", "_")


class ModelRegistry:
    def __init__(self, config: Config, env: dict[str, str] | None = None):
        self.config = config
        self.profile: Profile = PROFILES[config.profile]
        self.specs = {spec.key: spec for spec in SPECS}
        self._env = dict(os.environ if env is None else env)

    def spec(self, key: str) -> ModelSpec:
        return self.specs[key]

    def source(self, key: str) -> ModelSource:
        spec = self.specs[key]
        if self.profile.tiny:
            return ModelSource(key, path=self.config.models_dir / "tiny" / key, filename=spec.filename)
        override = self.config.models.get(key, {})
        if self._env.get(env_var(key)):
            return ModelSource(key, path=Path(self._env[env_var(key)]), filename=spec.filename)
        if override.get("path"):
            return ModelSource(key, path=Path(override["path"]), filename=override.get("filename", spec.filename))
        return ModelSource(
            key,
            repo=override.get("repo", spec.repo),
            revision=override.get("revision", spec.revision),
            filename=override.get("filename", spec.filename),
        )

    def how_to_provide(self, key: str) -> str:
        spec = self.specs[key]
        if spec.repo.startswith("https://"):  # a release file: fetched into torch's checkpoint cache
            fetch = f"download it (`curl -LO {spec.repo}`) and point {env_var(key)} at the file"
        else:
            fetch = f"download it (e.g. `hf download {spec.repo}`), or point {env_var(key)} at a local folder"
        return (
            f"model {key!r} ({spec.repo}) is not available offline: {fetch}, or set [models.{key}] path = \"...\" "
            f"in {self.config.data_dir / 'paletta.toml'}; `--profile tiny` runs without weights"
        )
