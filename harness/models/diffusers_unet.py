"""Pixel-space UNet checkpoints in diffusers' format (DDPM, iDDPM, ...): models.yaml `adapter: diffusers_unet`.

`source` is a hub id (e.g. google/ddpm-cifar10-32) read from the Hugging Face cache, never downloaded
at run time (parallel jobs would race, cluster nodes are often offline; fetch it once with
`hf download`), or a local folder written by save_pretrained: a pipeline folder
(model_index.json, unet/, scheduler/) or a bare model folder (config.json and weights, with
scheduler_config.json beside them).

The noise process is the one models.yaml states, and it must agree with the checkpoint's scheduler
config: a benchmark that silently re-read the betas could compare two models under one name. The
prediction type (epsilon, v_prediction, sample) comes from that config; `params.prediction` may
state it too and is then checked. Networks with a learned variance (out_channels = 2 x in_channels,
iDDPM) give their first half, the mean's prediction.

A scheduler config of class CMStochasticIterativeScheduler (openai/diffusers-cd_imagenet64_l2 and the
embedded digits-student are stored so) makes the UNet a consistency model: the Denoiser is
f(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)) of harness.models.consistency, on the EDM process of the
config's sigma range, which models.yaml's `process` must state (checked like the betas).

Class-conditional networks (num_class_embeds in their config) take the class label of each sample as the
Denoiser's `cond`; `params.null_class` names the label the network was trained on for "no class" (the
unconditional half of classifier-free guidance), by default the last embedding (diffusers' and stepbench's
trainers append it after the classes).

    params: {subfolder: unet, dtype: float32 | float16 | bfloat16 | float64, prediction: eps | v | x0,
             null_class: int, network_batch: rows per network call (64; see NetworkDenoiser),
             cache_dir: the Hugging Face cache to read (default: HF_HUB_CACHE / ~/.cache/huggingface/hub),
             allow_pickle: load .bin/.pt weights (torch.load with weights_only=True); safetensors only by default,
             compile: torch.compile the UNet, once per process (harness.models.compiled)}

What is refused, and why, is harness.models.checkpoint's: the checkpoint must be a pixel UNet2DModel (a pipeline
folder of DDPMPipeline, DDIMPipeline, PNDMPipeline or ConsistencyModelPipeline, or a bare model folder) whose
weights all load.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.errors import ConfigError
from harness.models.base import DenoiserInfo, NetworkDenoiser, network_batch
from harness.models.checkpoint import locate
from harness.models.compiled import compile_mode, load_network
from harness.models.consistency import SCHEDULER_CLASS, ConsistencyParametrisation, check_edm_process
from harness.schedules import VPDiscrete, make_process

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


PIPELINES = {"DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "ConsistencyModelPipeline"}
MODEL_CLASSES = {"UNet2DModel"}
# either layout (pipeline folder or bare model), safetensors only
FILES = ["*.json", "diffusion_pytorch_model.safetensors", "unet/*.json", "unet/diffusion_pytorch_model.safetensors",
         "scheduler/*"]


class DiffusersUNet(NetworkDenoiser):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _checkpoint_setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "DiffusersUNet":
        from diffusers import UNet2DModel

        params = spec.get("params", {})
        checkpoint, subfolder, process, prediction, consistency = _checkpoint_setup(spec)
        source = checkpoint.source
        dtype = _dtype(params.get("dtype", "float32"))
        unet, network = load_network(checkpoint, subfolder, UNet2DModel, dtype, device, params)
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = unet.config.in_channels
        embeds = unet.config.num_class_embeds
        # stepbench's trained networks keep their last embedding for the unconditional model; a hub network
        # trained without label dropout (openai/diffusers-cd_imagenet64_l2) says `null_class: null`
        null_class = params.get("null_class", embeds - 1 if embeds else None)
        classes = embeds - (null_class is not None) if embeds else 0
        if classes != spec.get("classes", 0):  # the grid plans labels and guidance from the entry
            null = "a null class" if null_class is not None else "no null class"
            raise ConfigError(f"{source}: the network has {embeds or 0} class embeddings ({classes} classes and {null}); "
                              f"the models.yaml entry says classes: {spec.get('classes', 'none')}")
        info = DenoiserInfo(
            data_shape=(channels, height, width),
            data_range=(-1.0, 1.0),
            prediction=prediction,
            process=process,
            dtype=dtype,
            device=device,
            num_classes=classes,
            null_class=null_class,
            extra={"source": source, **({"consistency": consistency} if consistency else {})},
        )

        def unet_call(x_t, t, labels):
            return network(x_t, t, class_labels=labels, return_dict=False)[0]

        def make_net(call):
            """The Denoiser's network around `call(x_t, t, class_labels)`: the UNet, or a transform of it."""

            def network(x_t, t, cond=None):
                labels = None
                if embeds:  # a class-conditional network: no labels means the unconditional model
                    labels = cond if cond is not None else torch.full((len(x_t),), null_class, device=x_t.device)
                return call(x_t, t, labels)[:, :channels]  # learned-variance networks append their variance channels

            @torch.inference_mode()
            def net(x_t, t, cond=None):
                if consistency is None:
                    return network(x_t, t, cond)
                return consistency.apply(network, x_t, t, cond)  # on the EDM process t is sigma, x_t is x

            return net

        # 64 rows: digits-unet on one CPU thread spends 1.06 ms per row at 64, 0.74 at 256, but every call pays a
        # whole chunk, and the preparations' calls are small (DC-Solver fits on 10 samples: 8x slower at 256)
        return cls(make_net(unet_call), info, module=unet, chunk=network_batch(params, 64), rebind=make_net)


def _checkpoint_setup(spec: dict):
    """(checkpoint, UNet subfolder, noise process, prediction type, consistency parametrisation or None) of an
    entry, from its config files alone (small files): the checkpoint is found, is a pixel UNet in a format loaded
    faithfully, and agrees with models.yaml, or a one-line error says why not. A consistency model's Denoiser
    predicts x0 (its output is f)."""
    params = spec.get("params", {})
    checkpoint = locate(spec, "diffusers_unet", FILES)
    source = checkpoint.source
    _dtype(params.get("dtype", "float32"))
    compile_mode(params, source)
    network_batch(params, 64)
    # a pipeline folder names its parts; a latent pipeline (LDMPipeline's vqvae) is refused, not read as pixels
    index = checkpoint.check_pipeline(PIPELINES, latent_components={"vqvae", "vae"})
    if index is not None and "unet" not in index:
        raise ConfigError(f"diffusers_unet: {source}'s model_index.json has no unet")
    # some hub pipelines (google/ddpm-cifar10-32) keep their parts flat beside model_index.json
    nested = index is not None and (checkpoint.root / "unet").is_dir()
    subfolder = params.get("subfolder", "unet" if nested else None)
    checkpoint.check_class(subfolder, MODEL_CLASSES)
    checkpoint.weights(subfolder)
    scheduler_folder = "scheduler" if nested else subfolder
    scheduler_config = checkpoint.config(scheduler_folder, "scheduler_config.json")
    process = make_process(spec["process"])
    if scheduler_config.get("_class_name") == SCHEDULER_CLASS:
        consistency = ConsistencyParametrisation.from_scheduler_config(scheduler_config)
        check_edm_process(source, process, consistency)
        if params.get("prediction") not in (None, "x0"):
            raise ConfigError(f"{source}: params.prediction is {params['prediction']!r} but a consistency model "
                              f"predicts x0")
        return checkpoint, subfolder, process, "x0", consistency
    _check_process(source, process, scheduler_config)
    return checkpoint, subfolder, process, _prediction(source, scheduler_config, params.get("prediction")), None


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"params.dtype {name!r} unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _checkpoint_betas(config: dict) -> np.ndarray:
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    keys = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
    return VPDiscrete.from_config(**{k: config[k] for k in keys if k in config}).betas


def _check_process(source: str, process, config: dict) -> None:
    if not isinstance(process, VPDiscrete):
        raise ConfigError(f"{source}: a diffusers DDPM-style UNet needs process kind vp_discrete, not {process.kind}")
    theirs = _checkpoint_betas(config)
    ours = process.betas
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-6, atol=1e-12):
        raise ConfigError(
            f"{source}: models.yaml's process ({len(ours)} betas from {ours[0]:.6g} to {ours[-1]:.6g}) disagrees "
            f"with the checkpoint's scheduler config ({config.get('beta_schedule')}, {len(theirs)} betas from "
            f"{theirs[0]:.6g} to {theirs[-1]:.6g})"
        )


def _prediction(source: str, config: dict, stated: str | None) -> str:
    theirs = config.get("prediction_type", "epsilon")
    if theirs not in PREDICTIONS:
        raise ConfigError(f"{source}: prediction_type {theirs!r} unsupported; valid: {', '.join(PREDICTIONS)}")
    prediction = PREDICTIONS[theirs]
    if stated is not None and stated != prediction:
        raise ConfigError(f"{source}: params.prediction is {stated!r} but the checkpoint predicts {theirs!r}")
    return prediction
