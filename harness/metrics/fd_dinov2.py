"""FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2's headline metric):
the Fréchet distance between Gaussian fits of DINOv2 ViT-L/14 CLS features of the samples and of the reference
images.

It is FID's computation (fidelity.frechet_value: float64 statistics, the trace term of frechet.py, the bootstrap,
reference statistics cached under <cache>/refstats keyed by the weights' sha256) with torch-fidelity's DINOv2
extractor (uint8 -> TF1-compatible bilinear to 224 x 224 -> ImageNet normalisation -> CLS token, 1024-d) whose
network harness.metrics.dinov2 loads from a local file: nothing goes through torch.hub or the network.

    dinov2: {weights: PATH,                  # dinov2_vitl14_pretrain.pth (required; README has the download line)
             model: dinov2-vit-l-14,         # or -s-14 / -b-14 / -g-14 (with their own files)
             reference_data: {...}}          # optional: otherwise the model's reference_data / dataset

The reference images are the model's own unless `dinov2.reference_data` names others; statistics of Inception
features (a model's `npz_stats`) cannot serve, so such a model needs `dinov2.reference_data` (DINOv2 statistics,
or images). EDM2 (calculate_metrics.py) resizes bicubically with antialiasing before DINOv2, torch-fidelity
bilinearly as TF1 did; values therefore compare with torch-fidelity's, not exactly with EDM2's published ones.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ConfigError, valid_names
from harness.metrics.base import EvalContext, Metric, MetricValue

DEFAULT_MODEL = "dinov2-vit-l-14"
DEFINITION = ("Frechet distance of DINOv2 CLS features (torch-fidelity's extractor: TF1 bilinear to 224, ImageNet "
              "normalisation), Gaussian fits in float64")


def download_hint(name: str, path: Path) -> str:
    from harness.metrics.dinov2 import download_url

    return f"download it once with `mkdir -p {path.parent} && wget {download_url(name)} -O {path}`"


def dinov2_setup(model_spec: dict, model_id: str):
    """fd_dinov2's FidelitySetup for a models.yaml entry, from the entry alone (planning calls it)."""
    from harness.metrics.bootstrap import BootstrapSpec
    from harness.metrics.dinov2 import ARCHITECTURES, weights_filename
    from harness.metrics.fidelity import FidelitySetup
    from harness.metrics.refdata import reference_source

    cfg = model_spec.get("dinov2")
    if not isinstance(cfg, dict) or "weights" not in cfg:
        default = Path("checkpoints") / weights_filename(DEFAULT_MODEL)
        raise ConfigError(f"key '{model_id}.dinov2.weights' missing; fd_dinov2 loads DINOv2 from a local file: "
                          f"{download_hint(DEFAULT_MODEL, default)} and set dinov2: {{weights: {default}}}")
    name = cfg.get("model", DEFAULT_MODEL)
    if name not in ARCHITECTURES:
        raise ConfigError(f"key '{model_id}.dinov2.model': {name!r} unknown{valid_names(name, ARCHITECTURES)}")
    if "reference_data" in cfg:
        source = reference_source({"reference_data": cfg["reference_data"]}, f"{model_id}.dinov2")
    else:
        source = reference_source(model_spec, model_id)
        if not source.has_images:
            raise ConfigError(f"key '{model_id}.reference_data' holds precomputed statistics of the FID extractor; "
                              f"fd_dinov2 needs reference images or DINOv2 statistics: set {model_id}.dinov2."
                              f"reference_data")
    weights = str(Path(str(cfg["weights"])).expanduser())
    return FidelitySetup("torch-fidelity", name, weights, source, BootstrapSpec.from_model_spec(model_spec, model_id))


def check_weights(setup, model_id: str) -> Path:
    """The weights file, or one line naming the file to download and where to put it."""
    path = Path(setup.weights_config)
    if not path.is_file():
        raise ConfigError(f"key '{model_id}.dinov2.weights': {path} not found; nothing is downloaded at run time: "
                          f"{download_hint(setup.extractor, path)}")
    return path


class FDDINOv2(Metric):
    name = "fd_dinov2"
    higher_is_better = False

    def compute(self, ctx: EvalContext) -> MetricValue:
        from harness.metrics.fidelity import frechet_value

        model_id = ctx.cell.get("model", "?")
        setup = ctx.memo("fd_dinov2-setup", lambda: dinov2_setup(ctx.model_spec, model_id))
        check_weights(setup, model_id)
        result = frechet_value(ctx, setup)
        result.provenance = {**result.provenance, "definition": DEFINITION,
                             "network": "harness.metrics.dinov2.DinoV2 (facebookresearch/dinov2's eval forward)"}
        return result
