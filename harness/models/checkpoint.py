"""Finding and loading diffusers-format checkpoints faithfully, for every adapter that reads one.

A benchmark that scores random weights or undecoded latents under a model's name is worse than one that
refuses, so each rule here ends in a one-line error rather than a guess:
- the folder is found without a download: a local folder, or a hub id already in the Hugging Face cache
  (offline, the line gives the `hf download` command with the files the adapter needs and the cache it reads);
- the layout is read, not tried: a pipeline folder has model_index.json and names its components' subfolders,
  a bare model folder has config.json at the top; so an error is the one attempt that explains it;
- the class named in model_index.json / config.json (`_class_name`) is one the adapter supports, else the line
  names the class found and the adapter that takes it (a DiT config is never built as a UNet2DModel);
- weights are safetensors unless the entry says `params.allow_pickle: true` (then torch.load(weights_only=True),
  as diffusers and transformers do for .bin);
- every weight the network expects is in the file and every tensor in the file is used, else the load is
  refused (missing weights would be randomly initialised).
All but the last are read from config files and folder listings, so they run while a grid is planned.

A network's weights published apart from its pipeline (DMD2's UNet-only file for SDXL base: `params.unet_weights`
of diffusers_sdxl) are one file under the same rules (locate_weights_file): found without a download, safetensors
unless pickles are allowed, every key loaded into the component's config (load_module's `weights`); a safetensors
file's keys and shapes are checked against the config at planning (check_weights_file), a pickle's when it loads.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError

# Which stepbench adapter takes a checkpoint class (config.json) or pipeline class (model_index.json); None:
# none does yet. What an adapter itself accepts is its own SUPPORTED set; this map only makes the refusal useful.
ADAPTER_FOR_CLASS: dict[str, str | None] = {
    "UNet2DModel": "diffusers_unet",
    "DDPMPipeline": "diffusers_unet",
    "DDIMPipeline": "diffusers_unet",
    "PNDMPipeline": "diffusers_unet",
    "ConsistencyModelPipeline": "diffusers_unet",
    "UNet2DConditionModel": "diffusers_sd",
    "StableDiffusionPipeline": "diffusers_sd",
    "LatentConsistencyModelPipeline": "diffusers_lcm",
    "DiTTransformer2DModel": "diffusers_dit",
    "DiTPipeline": "diffusers_dit",
    "SD3Transformer2DModel": "diffusers_sd3",
    "StableDiffusion3Pipeline": "diffusers_sd3",
    "LDMPipeline": None,  # a UNet on VQ-VAE latents
    "StableDiffusionXLPipeline": "diffusers_sdxl",
    "AudioLDMPipeline": "diffusers_audioldm",
    "AudioLDM2Pipeline": None,
}
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# weights of models saved by diffusers (diffusion_pytorch_model.*) and transformers (model.*, pytorch_model.*)
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def taken_by(class_name: str | None) -> str:
    """'adapter X takes it' / 'no stepbench adapter takes it yet', for a refusal."""
    adapter = ADAPTER_FOR_CLASS.get(class_name or "")
    return f"adapter {adapter} takes it" if adapter else "no stepbench adapter takes it yet"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder on this machine, as an adapter named `adapter` reads it."""

    source: str  # as models.yaml gives it (hub id or path)
    root: Path  # the local folder (a hub id's cache snapshot)
    adapter: str
    allow_pickle: bool
    hint: str  # how to fetch what the adapter needs, for errors about missing files

    @property
    def pipeline(self) -> dict | None:
        """model_index.json of a pipeline folder, None for a bare model folder."""
        path = self.root / "model_index.json"
        return read_json(path) if path.is_file() else None

    def where(self, subfolder: str | None) -> str:
        return f"{self.source}/{subfolder}" if subfolder else self.source

    def folder(self, subfolder: str | None) -> Path:
        folder = self.root / subfolder if subfolder else self.root
        if not folder.is_dir():
            raise ConfigError(f"{self.adapter}: {self.source} has no {subfolder}/ folder{self.hint}")
        return folder

    def config(self, subfolder: str | None, name: str = "config.json") -> dict:
        path = self.folder(subfolder) / name
        if not path.is_file():
            raise ConfigError(f"{self.adapter}: {self.where(subfolder)} has no {name}{self.hint}")
        return read_json(path)

    def check_pipeline(self, supported: set[str], latent_components: set[str] = frozenset()) -> dict | None:
        """model_index.json's class is one of `supported`, if the folder is a pipeline; its index."""
        index = self.pipeline
        if index is None:
            return None
        found = index.get("_class_name")
        if found not in supported:
            latent = sorted(latent_components & set(index))
            why = f" (its {', '.join(latent)} makes it a latent model)" if latent else ""
            raise ConfigError(f"{self.adapter}: {self.source} is a {found} folder{why}, not one of "
                              f"{', '.join(sorted(supported))}; {taken_by(found)}")
        return index

    def check_class(self, subfolder: str | None, supported: set[str]) -> dict:
        """The component's config.json, whose `_class_name` is one of `supported`."""
        config = self.config(subfolder)
        # diffusers names the class in _class_name, transformers in architectures
        found = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if found not in supported:
            raise ConfigError(f"{self.adapter}: {self.where(subfolder)}/config.json names {found}, not "
                              f"{' or '.join(sorted(supported))}; {taken_by(found)}")
        return config

    def weights(self, subfolder: str | None) -> Path:
        """The component's weights file (or shard index), safetensors unless pickles are allowed."""
        folder = self.folder(subfolder)
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.split(".")[0] in WEIGHT_STEMS]
        safe = [p for p in files if p.name.endswith(SAFE_SUFFIXES) or p.name.endswith(".safetensors.index.json")]
        if safe:
            return safe[0]
        pickles = [p for p in files if p.name.endswith(PICKLE_SUFFIXES) or p.name.endswith(".bin.index.json")]
        if not pickles:
            raise ConfigError(f"{self.adapter}: {self.where(subfolder)} has no weights file{self.hint}")
        if not self.allow_pickle:
            raise ConfigError(f"{self.adapter}: {self.where(subfolder)} holds only {pickles[0].name}, a pickle "
                              f"(loading one can run code); convert it to safetensors, or set params.allow_pickle: "
                              f"true to load it with torch.load(weights_only=True)")
        return pickles[0]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable JSON config ({err})") from None


def locate(spec: dict, adapter: str, files: list[str]) -> Checkpoint:
    """The entry's checkpoint folder: `source` as a local folder, or a hub id in the Hugging Face cache.
    `files` are the patterns the adapter reads (for the download command of an offline error)."""
    params = spec.get("params", {})
    source = spec.get("source")
    if not source:
        raise ConfigError(f"adapter {adapter} needs `source`: a hub id or a local folder")
    allow_pickle = params.get("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        raise ConfigError(f"{source}: params.allow_pickle is true or false, not {allow_pickle!r}")
    cache_dir = params.get("cache_dir")
    command = (f"hf download {source} --include {' '.join(repr(f) for f in files)}"
               + (f" --cache-dir {cache_dir}" if cache_dir else ""))
    # a hub id is "org/name"; a missing path that is plainly local (absolute, ./, ~, or inside a folder that exists
    # here) needs no hint about the hub
    path = Path(source).expanduser()
    local = source.startswith(("/", ".", "~")) or path.is_dir() or (path.parent != Path(".") and path.parent.is_dir())
    if local:
        if not path.is_dir():
            raise ConfigError(f"{adapter}: source {source}: no such folder")
        return Checkpoint(source, path, adapter, allow_pickle, hint="")
    hint = f" (fetch what the adapter reads once with `{command}`)"
    if source.count("/") != 1:
        raise ConfigError(f"{adapter}: source {source} is neither a folder here nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = Path(snapshot_download(source, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001  (huggingface_hub's offline errors differ between versions)
        raise ConfigError(f"{adapter}: {source} is not in the Hugging Face cache ({cache_dir or HF_HUB_CACHE}) and "
                          f"nothing is downloaded at run time; fetch it once with `{command}`, or give `source` as a "
                          f"local folder") from None
    return Checkpoint(source, root, adapter, allow_pickle, hint)


def load_module(checkpoint: Checkpoint, subfolder: str | None, cls, dtype, weights: "WeightsFile | None" = None,
                **kwargs):
    """cls.from_pretrained on the component, refused unless every weight loads (nothing randomly initialised,
    nothing left over). diffusers and transformers both report the keys with output_loading_info. `weights`: a
    file from elsewhere in place of the component's own, loaded into its config (a diffusers model)."""
    if weights is not None:
        return _load_weights_file(checkpoint, subfolder, cls, dtype, weights)
    found = checkpoint.weights(subfolder)  # the format rule, before any file is opened
    from diffusers import ModelMixin

    if issubclass(cls, ModelMixin):  # diffusers: low_cpu_mem_usage=False builds every module, then fills it
        kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": False, **kwargs}
    else:  # transformers
        kwargs = {"dtype": dtype, **kwargs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the format of the file found: with allow_pickle, a folder of safetensors still loads them
            model, info = cls.from_pretrained(str(checkpoint.root), subfolder=subfolder or "", local_files_only=True,
                                              use_safetensors=".safetensors" in found.name, output_loading_info=True,
                                              **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError) as err:  # a config it cannot build, a file it cannot read
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{checkpoint.adapter}: {cls.__name__} cannot be loaded from {checkpoint.where(subfolder)}: "
                          f"{first}") from None
    refuse_unless_all_load(checkpoint.adapter, checkpoint.where(subfolder), cls.__name__,
                           info.get("missing_keys", []), info.get("unexpected_keys", []),
                           [str(m[0]) for m in info.get("mismatched_keys", [])])
    return model.eval()


def refuse_unless_all_load(adapter: str, where: str, class_name: str, missing, unexpected, mismatched) -> None:
    """The one line that refuses weights which do not fit their network's config (keys missing, left over or
    mis-shaped)."""
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    if missing or unexpected or mismatched:
        parts = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
                 ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "mis-shaped")) if keys]
        raise ConfigError(f"{adapter}: the weights in {where} do not fit its {class_name} config: {', '.join(parts)} "
                          f"weights; refusing to sample a partly random network")


@dataclass(frozen=True)
class WeightsFile:
    """One network's weights published apart from its pipeline, found on this machine."""

    path: Path
    where: str  # as the entry names it (source/file), for errors
    safe: bool  # safetensors; else a pickle the entry allows


def locate_weights_file(value, adapter: str, key: str, params: dict) -> WeightsFile:
    """`params.<key>: {source: a hub id or a local folder, file: the weights file in it}` as a file here: a hub
    file comes from the Hugging Face cache (offline, the line says what to download), and it is safetensors
    unless params.allow_pickle."""
    if not isinstance(value, dict) or set(value) != {"source", "file"} \
            or not all(isinstance(v, str) and v for v in value.values()):
        raise ConfigError(f"{adapter}: params.{key} is {{source: a hub id or a local folder, file: the weights file "
                          f"in it}}, not {value!r}")
    folder = locate({"source": value["source"], "params": params}, adapter, [value["file"]])
    path, where = folder.root / value["file"], f"{value['source']}/{value['file']}"
    if not path.is_file():
        raise ConfigError(f"{adapter}: params.{key}: {where} not found{folder.hint}")
    if path.name.endswith(SAFE_SUFFIXES):
        return WeightsFile(path, where, safe=True)
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise ConfigError(f"{adapter}: params.{key}: {where} is neither safetensors nor a torch pickle "
                          f"({', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)})")
    if not folder.allow_pickle:
        raise ConfigError(f"{adapter}: params.{key}: {where} is a pickle (loading one can run code); convert it "
                          f"to safetensors, or set params.allow_pickle: true to load it with "
                          f"torch.load(weights_only=True)")
    return WeightsFile(path, where, safe=False)


def _empty_network(checkpoint: Checkpoint, subfolder: str | None, cls):
    """The component's network built from its config on the meta device: its expected weights, none allocated."""
    import torch

    config = cls.load_config(str(checkpoint.folder(subfolder)))
    with torch.device("meta"):
        return cls.from_config(config)


def check_weights_file(checkpoint: Checkpoint, subfolder: str | None, cls, weights: WeightsFile) -> None:
    """At planning: a safetensors file's keys and shapes (its header) fit the component's config; a pickle is
    read only when it loads."""
    if not weights.safe:
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights.path), framework="pt") as file:
            found = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as err:  # noqa: BLE001  (safetensors' errors are its own class, or OSError)
        raise ConfigError(f"{checkpoint.adapter}: {weights.where} is not a readable safetensors file ({err})") from None
    _refuse_unless_fits(checkpoint, cls, weights, _empty_network(checkpoint, subfolder, cls).state_dict(), found)


def _refuse_unless_fits(checkpoint: Checkpoint, cls, weights: WeightsFile, expected: dict, found: dict) -> None:
    refuse_unless_all_load(checkpoint.adapter, weights.where, cls.__name__, set(expected) - set(found),
                           set(found) - set(expected),
                           [k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k])])


def _load_weights_file(checkpoint: Checkpoint, subfolder: str | None, cls, dtype, weights: WeightsFile):
    import torch

    try:
        if weights.safe:
            from safetensors.torch import load_file

            state = load_file(str(weights.path))
        else:  # weights_only: tensors and plain containers, no code
            state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (unpickling, safetensors and OS errors differ)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{checkpoint.adapter}: {weights.where} cannot be read: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{checkpoint.adapter}: {weights.where} is not a state dict (names -> tensors)")
    model = _empty_network(checkpoint, subfolder, cls)
    _refuse_unless_fits(checkpoint, cls, weights, model.state_dict(), {k: tuple(v.shape) for k, v in state.items()})
    # the file's tensors, in `dtype`, become the network's (meta until now)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict: it would have no value
        raise ConfigError(f"{checkpoint.adapter}: {cls.__name__} from {weights.where} leaves {left[0]} unset")
    return model.eval()


def load_tokenizer(checkpoint: Checkpoint, subfolder: str, cls):
    """cls.from_pretrained on a tokenizer folder of the checkpoint, from local files; one line if it cannot be read."""
    folder = checkpoint.folder(subfolder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{checkpoint.adapter}: {cls.__name__} cannot be loaded from {checkpoint.where(subfolder)}: "
                          f"{first}") from None
