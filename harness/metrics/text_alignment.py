"""What CLIP score and CLAP score share: prompts per sample, cosine scores, a bootstrap interval,
and finding weights without a download.

Prompts come from the model spec (models.yaml `prompts`): a list of captions, or the path of a text
file with one caption per line, or a COCO captions JSON. Sample i of a cell seeded with `seed` is generated from
caption prompt_indices(seed, [i], N): like a class label (harness.labels), every block of N consecutive samples
takes each caption once, in an order drawn from (seed, block), so different seeds of a grid see different
captions, a sample's caption does not depend on its batch, and all methods of a model give sample i the same
caption. `prompt_indices` is the one place that rule lives; the adapters record each sample's index in
samples.npz (`prompt_index`) and the metrics read the cell's own record (`recorded_prompts`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError
from harness.metrics.bootstrap import BootstrapSpec
from harness.metrics.bootstrap import bootstrap_interval as _bootstrap
from harness.progress import batch_progress

BOOTSTRAP = BootstrapSpec(resamples=1000, confidence=0.95, seed=0)  # a mean of per-sample scores is cheap


# --- prompts ---------------------------------------------------------------------------------------

def load_prompts(model_id: str, spec: dict) -> list[str]:
    """The model's captions from models.yaml `prompts` (a list, or a text file with one per line)."""
    if "prompts" not in spec:
        raise ConfigError(f"key '{model_id}.prompts' missing; clip_score/clap_score need the "
                          f"captions the samples were generated from (a list, or a text file, one per line)")
    prompts = spec["prompts"]
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"key '{model_id}.prompts': file {path} not found "
                              f"(relative paths are taken from the working directory {Path.cwd()})")
        if path.suffix == ".json":  # COCO captions (captions_val2014.json): annotations[].caption, in file order
            try:
                prompts = [a["caption"].strip() for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"key '{model_id}.prompts': {path} is not a COCO captions file "
                                  f"({{\"annotations\": [{{\"caption\": ...}}, ...]}})") from None
        else:  # blank lines are layout, not empty captions
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError(f"key '{model_id}.prompts': needs at least one non-empty caption")
    return list(prompts)


PROMPT_STREAM = 0x7072  # the captions' random stream, apart from the class labels' (harness.labels)


def prompt_indices(seed: int, indices, num_prompts: int) -> np.ndarray:
    """int64 caption indices of the samples `indices` of a cell seeded with `seed`: they depend only on (seed, i),
    as the noise does (a seeded permutation per block of N samples, harness.labels.balanced_indices)."""
    from harness.labels import balanced_indices

    return balanced_indices(seed, indices, num_prompts, PROMPT_STREAM)


def prompts_for_samples(prompts: Sequence[str], seed: int, num_samples: int) -> list[str]:
    """The captions of samples 0 .. S - 1 of a cell seeded with `seed`."""
    return [prompts[i] for i in prompt_indices(seed, range(num_samples), len(prompts))]


def recorded_prompts(prompt_index, prompts: Sequence[str], num_samples: int, metric: str) -> list[str]:
    """The captions a cell's samples were generated from, by the indices its samples.npz records."""
    if prompt_index is None:
        raise StepbenchError(f"{metric}: the cell's samples.npz records no prompt_index (the caption of each "
                             "sample); it was not sampled by a text-conditional adapter, or before they were "
                             "recorded: sample it again")
    index = np.asarray(prompt_index, dtype=np.int64)
    if index.shape != (num_samples,):
        raise StepbenchError(f"{metric}: the cell records {list(index.shape)} prompt indices for {num_samples} "
                             "samples; sample it again")
    if len(index) and (index.min() < 0 or index.max() >= len(prompts)):
        raise StepbenchError(f"{metric}: the cell's prompt_index reaches {int(index.max())} but the model has "
                             f"{len(prompts)} prompts (its prompts changed since the cell was sampled: sample again)")
    return [prompts[i] for i in index]


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


# --- scores ----------------------------------------------------------------------------------------

def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [S, D] embedding sets, in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def clip_score_from_cosine(cosine: torch.Tensor) -> torch.Tensor:
    """CLIPScore per pair (Hessel et al. 2021, w = 100 as in torchmetrics): 100 * max(cos, 0)."""
    return 100.0 * cosine.clamp(min=0.0)


def embed_in_batches(count: int, batch_size: int, embed_batch) -> torch.Tensor:
    """torch.cat of embed_batch(start, stop) over consecutive batches of `count` items, without autograd;
    each batch's embeddings come back as float32 on the CPU."""
    starts = range(0, count, batch_size)
    progress = batch_progress(len(starts), "embedding")
    out = []
    with torch.inference_mode():
        for start in starts:
            out.append(embed_batch(start, min(start + batch_size, count)).float().cpu())
            progress.update(1)
    progress.close()
    return torch.cat(out)


def bootstrap_interval(values: np.ndarray) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-sample values (the harness's one bootstrap, fixed seed)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array; got shape {values.shape}")
    return _bootstrap(lambda index: float(values[index.numpy()].mean()), len(values), BOOTSTRAP, float(values.mean()))


def bootstrap_provenance() -> dict:
    return {**BOOTSTRAP.provenance(), "statistic": "mean over samples"}


# --- weights without surprises -----------------------------------------------------------------------

def downloads_allowed() -> bool:
    """False when the Hugging Face hub is switched off (HF_HUB_OFFLINE=1): then only caches are read."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return not constants.HF_HUB_OFFLINE


def hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def files_sha256(paths: Sequence[Path]) -> str:
    """One sha256 over several files (a sharded checkpoint), in name order; equals the file's own
    sha256 when there is one file."""
    paths = sorted(Path(p) for p in paths)
    from harness.metrics.features import file_sha256

    if len(paths) == 1:
        return file_sha256(paths[0])
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def missing_weights(what: str, where: str, cause: BaseException | None = None) -> StepbenchError:
    """The one line a user sees when weights are not on this machine."""
    reason = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
    hint = "" if downloads_allowed() else "; downloads are off (HF_HUB_OFFLINE)"
    return StepbenchError(f"{what}: weights not found; looked in {where}{hint}{reason}")
