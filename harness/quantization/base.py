"""What every scheme returns: a QuantizedNet, plus the honest accounting of its size and kernels."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import re
from dataclasses import dataclass, field
from unittest import mock

import torch

from harness.errors import StepbenchError
from harness.quantization.calibration import as_inputs


class TensorNet(torch.nn.Module):
    """net(x_t, t, class_labels) -> Tensor for a network with the diffusers UNet2DModel convention
    (a diffusers model is asked for return_dict=False; a tuple or an output object is unwrapped).
    Export and compile need one plain tensor out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net  # the exported graph's module names are "net.<name in the network>"
        try:
            self._return_dict = "return_dict" in inspect.signature(net.forward).parameters
        except (TypeError, ValueError):
            self._return_dict = False

    def forward(self, x, t, class_labels=None):
        kwargs = {"return_dict": False} if self._return_dict else {}
        out = self.net(x, t, class_labels=class_labels, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "sample", out)


@dataclass
class Artifact:
    """What rebuilds a quantised network without recalibrating: tensors (saved as safetensors) and
    JSON-able metadata. `meta["scheme"]`, `meta["simulate"]` and `meta["net_sha256"]` are always set."""

    tensors: dict[str, torch.Tensor]
    meta: dict


@dataclass
class QuantizedNet:
    """qnet(x_t, t, class_labels=None) -> Tensor, the quantised version of `net`.

    `runner(x, t, labels)` is the quantised callable (labels omitted when the graph was built
    without them). Graphs exported with a batch range [lo, hi] (PT2E) run in chunks of
    `compiled_batch` rows, the last chunk padded by repeating its last row, so the static compiled
    graph is built once. Every row is computed on its own (convolutions, group norms and attention
    act per sample, activation scales are static), so padding changes a row's result by kernel
    rounding at most (tested: a row at the same place of a chunk is bit-identical, elsewhere
    within 1e-5), and sample i still depends only on its own inputs."""

    runner: object
    scheme: str
    simulated: bool
    module: torch.nn.Module  # the quantised module before compilation: what size_bytes counts
    artifact: Artifact
    conditional: bool | None = None  # None: either; True/False: the graph was built with/without labels
    batch_range: tuple[int, int] | None = None
    compiled_batch: int | None = None
    compiled: bool = False
    kernel_note: str = ""  # what the scheme's kernels are, in words (see precision())
    kernels: collections.Counter = field(default_factory=collections.Counter)  # extern ops in the compiled code
    capture_kernels: bool = False
    freezing: bool = False
    nominal_size: int | None = None  # simulated schemes: the packed size, not the fp32 tensors they run on
    require_int8: bool = False  # w8a8: refuse to run on if the compiled code holds no int8 kernel

    def __call__(self, x_t, t, class_labels=None) -> torch.Tensor:
        x, t, c = as_inputs(x_t, t, class_labels)
        if self.conditional is True and c is None:
            raise StepbenchError("this quantised network was built class-conditional: pass class_labels")
        if self.conditional is False and c is not None:
            raise StepbenchError("this quantised network was built without class labels (its calibration had none)")
        with torch.no_grad(), (torch._inductor.config.patch(freezing=True) if self.freezing else contextlib.nullcontext()):
            if self.batch_range is None:
                return self._run(x, t, c)
            lo, hi = self.batch_range
            if self.compiled_batch is None:
                self.compiled_batch = min(max(x.shape[0], lo), hi)
            n = self.compiled_batch
            outs = []
            for s in range(0, x.shape[0], n):
                xs, ts, cs = x[s:s + n], t[s:s + n], None if c is None else c[s:s + n]
                rows = xs.shape[0]
                if rows < n:  # pad to the compiled batch with copies of the last row
                    xs, ts, cs = (None if v is None else torch.cat([v, v[-1:].expand(n - rows, *v.shape[1:])])
                                  for v in (xs, ts, cs))
                outs.append(self._run(xs, ts, cs)[:rows])
            return torch.cat(outs)

    def _run(self, x, t, c):
        args = (x, t) if c is None else (x, t, c)
        if not self.capture_kernels:
            return self.runner(*args)
        # the first call compiles: keep the generated code's extern kernel calls as evidence of what
        # ran (what torch._inductor.utils.run_and_get_code does, without its torch._dynamo.reset())
        from torch._inductor.graph import GraphLowering

        original = GraphLowering.save_output_code

        def save(code: str) -> None:
            self.kernels.update(extern_kernel_calls(code))
            if original is not None:
                original(code)

        with mock.patch.object(GraphLowering, "save_output_code", save):
            out = self.runner(*args)
        self.capture_kernels = False
        if self.require_int8 and not any(k.startswith("onednn.q") for k in self.kernels):
            # fake-quant would pass every other check: do not call fp32 kernels int8
            raise StepbenchError(f"{self.scheme}: the compiled graph holds no oneDNN int8 kernels "
                                 f"({dict(self.kernels) or 'no code captured'})")
        return out

    def size_bytes(self) -> int:
        return self.nominal_size if self.nominal_size is not None else model_size_bytes(self.module)

    def precision(self) -> str:
        """The precision its kernels ran at: for a compiled PT2E graph read from the generated code,
        e.g. 'int8 (onednn qconv_pointwise x15, ...); fp32 elsewhere (extern bmm x12, ...)'."""
        text = lambda d: ", ".join(f"{k.split('.', 1)[1] if not k.startswith('extern') else k.replace('.', ' ')} x{v}"
                                   for k, v in sorted(d.items()))
        int8 = {k: v for k, v in self.kernels.items() if k.startswith("onednn.q")}
        rest = {k: v for k, v in self.kernels.items() if k not in int8}
        if int8:
            return f"int8 ({text(int8)})" + (f"; fp32 elsewhere ({text(rest)})" if rest else "")
        return self.kernel_note + (f"; compiled code calls {text(rest)}" if rest else "")

    def record(self) -> dict:
        """What a quantised cell records beside its timings."""
        return {"scheme": self.scheme, "simulated": self.simulated, "size_bytes": self.size_bytes(),
                "size_note": ("nominal: packed bit width of the simulated weights plus their scales" if self.simulated
                              else "bytes the quantised network holds (int8 weights, scales, zero points, fp32 rest)"),
                "precision": self.precision(), "compiled": self.compiled,
                "compiled_batch": self.compiled_batch, "timesteps_dtype": "float32"}


_EXTERN = re.compile(r"\b(?:torch\.ops\.(\w+)\.(\w+)\.\w+|extern_kernels\.(\w+))\(")


def extern_kernel_calls(code: str) -> collections.Counter:
    """Calls of library kernels in Inductor's generated wrapper code: {'onednn.qconv_pointwise': 15,
    'onednn.qlinear_pointwise': 14, 'mkldnn._convolution_pointwise': 2, 'extern.bmm': 12, ...}.
    Inductor's own fused C++ loops (norms, activations) are not counted."""
    counts = collections.Counter()
    for ns, op, ext in _EXTERN.findall(code):
        if ns == "inductor":  # buffer management, not compute
            continue
        counts[f"{ns}.{op}" if ns else f"extern.{ext}"] += 1
    return counts


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass (Int8Tensor: qdata, scale, zero_point) is
    counted through its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def graph_tensors(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors a GraphModule's graph reads (its get_attr nodes), in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                out.append(obj)
    return out


def model_size_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors a module computes with. For an FX GraphModule (a PT2E conversion) only
    the tensors its graph reads count: convert_pt2e leaves the fp32 originals of the quantised
    weights behind as unused attributes. Shared tensors count once."""
    if isinstance(module, torch.fx.GraphModule):
        tensors = graph_tensors(module)
    else:
        tensors = [*module.parameters(), *module.buffers()]
    seen, total = set(), 0
    for t in tensors:
        subclass = hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter)
        key = id(t) if subclass else (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def net_sha256(net: torch.nn.Module) -> str:
    """Fingerprint of a network's weights, so an artifact is never applied to another network."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
