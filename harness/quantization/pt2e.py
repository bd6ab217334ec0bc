"""`w8a8` on x86 CPUs: static int8 weights and activations through torchao's PT2E flow.

torch.export (dynamic batch) -> prepare_pt2e(X86InductorQuantizer, its default static config:
uint8 per-tensor activations with HistogramObserver, int8 per-channel symmetric weights with
PerChannelMinMaxObserver) -> the calibration inputs -> convert_pt2e -> torch.compile with
Inductor freezing, which lowers the q/dq pattern to oneDNN int8 qconv/qlinear kernels.

Checked on torch 2.14.1 / torchao 0.18.0:
- freezing must be on in torch._inductor.config while the graph compiles (we patch it around
  every call): `torch.compile(options={"freezing": True})` fails in FakeTensorProp with
  UnsupportedOperatorException onednn.qconv_prepack; without freezing the q/dq graph is not
  lowered to int8 kernels (0.85x of compiled fp32 in a trial here).
- compiling with a symbolic batch trips a stride assertion in the qconv lowering, so the graph
  is compiled static (dynamic=False) for one batch size and QuantizedNet pads to it.
- diffusers' Upsample2D branches on `batch >= 64`, so export gives the batch a range (VR[2, 63]
  for UNet2DModel); QuantizedNet runs larger batches in chunks.
- ObserverBase._load_from_state_dict resets `eps` to float32 eps when the dict carries no version
  metadata (as one read back from safetensors does), which changes the scale of small-weight
  channels (2**-12 is the x86 config's eps); observer buffers are therefore copied in place.

First and last layers: both papers keep them at 8 bit, i.e. at W8A8 everything is 8 bit, and the
network output is not quantised; that is what this does by default (convert_pt2e leaves the last
convolution's output fp32). `fp32_modules` keeps named modules (e.g. "conv_in", "conv_out") in fp32
via X86InductorQuantizer.set_module_name_qconfig(name, None).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from harness.errors import ConfigError, StepbenchError
from harness.quantization.base import Artifact, QuantizedNet, TensorNet, net_sha256

OBSERVER_PREFIX = "activation_post_process_"  # torchao's name for observers in a prepared graph


def _quantizer(fp32_modules):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    q = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in fp32_modules:
        q.set_module_name_qconfig(f"net.{name}", None)
    return q


def _batch_range(ep) -> tuple[int, int]:
    """The batch sizes the exported graph accepts, read from its range constraints."""
    x = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x")
    b = x.meta["val"].shape[0]
    if isinstance(b, int):
        return b, b
    from torch.utils._sympy.numbers import int_oo

    vr = ep.range_constraints[b.node.expr]
    return int(vr.lower), (2**31 - 1 if vr.upper == int_oo else int(vr.upper))


def export_prepared(net: torch.nn.Module, example: tuple, fp32_modules=()):
    """(prepared GraphModule with observers, batch range). `example` = (x, t, labels-or-None)."""
    from torch.export import Dim, export
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    names = {n for n, _ in net.named_modules()}
    bad = [m for m in fp32_modules if m not in names]
    if bad:
        raise ConfigError(f"fp32_modules: {bad[0]!r} is not a module of this network")
    x, t, c = example
    rows = lambda v: v[:2] if v.shape[0] >= 2 else v.expand(2, *v.shape[1:])  # 2: a size export keeps symbolic
    args = (rows(x), rows(t)) + (() if c is None else (rows(c),))
    ep = export(TensorNet(net).eval(), args, dynamic_shapes=({0: Dim.AUTO},) * len(args))
    return prepare_pt2e(ep.module(), _quantizer(fp32_modules)), _batch_range(ep)


def observer_state(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The observers' buffers after calibration (min/max, histograms, eps): all that calibration made."""
    return {k: v.detach().clone() for k, v in prepared.state_dict().items() if k.startswith(OBSERVER_PREFIX)}


def load_observer_state(prepared: torch.fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    mine = prepared.state_dict(keep_vars=True)
    want = {k for k in mine if k.startswith(OBSERVER_PREFIX)}
    if want != set(state):
        raise StepbenchError(f"w8a8 artifact does not fit this network's prepared graph ({len(set(state) - want)} "
                             f"observer buffers unknown, {len(want - set(state))} missing); recalibrate")
    with torch.no_grad():
        for k, v in state.items():
            mine[k].resize_(v.shape).copy_(v)  # in place: see the module docstring on eps


def run_chunked(module, inputs, batch_range, progress: bool, desc: str) -> None:
    lo, hi = batch_range
    with torch.no_grad():
        for x, t, c in tqdm(inputs, desc=desc, disable=not progress, leave=False):
            for s in range(0, x.shape[0], hi):
                part = [v[s:s + hi] for v in (x, t) + (() if c is None else (c,))]
                if part[0].shape[0] < lo:
                    part = [torch.cat([v, v[-1:].expand(lo - v.shape[0], *v.shape[1:])]) for v in part]
                module(*part)


def w8a8(net, calibration, *, fp32_modules=(), compile=True, batch_size=None, progress=True,
         observers: dict | None = None) -> QuantizedNet:
    """Calibrate (or load `observers` from an artifact), convert, compile. `calibration` is the
    normalised list; with `observers` only its first input is used, as the export example."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if next(net.parameters()).device.type != "cpu":
        raise ConfigError("w8a8 through PT2E + X86InductorQuantizer runs on CPU; on CUDA quantize() uses torchao's configs")
    net = net.eval()
    prepared, batch_range = export_prepared(net, calibration[0], fp32_modules)
    if observers is None:
        run_chunked(prepared, calibration, batch_range, progress, "w8a8 calibration")
        observers = observer_state(prepared)
    else:
        load_observer_state(prepared, observers)
    converted = convert_pt2e(prepared)
    conditional = calibration[0][2] is not None
    lo, hi = batch_range
    artifact = Artifact(observers, {"scheme": "w8a8", "simulate": False, "net_sha256": net_sha256(net),
                                    "fp32_modules": list(fp32_modules), "conditional": conditional,
                                    "example_shape": list(calibration[0][0].shape[1:]),
                                    "calibration_inputs": len(calibration)})
    runner = torch.compile(converted, dynamic=False) if compile else converted
    return QuantizedNet(runner=runner, scheme="w8a8", simulated=False, module=converted, artifact=artifact,
                        conditional=conditional, batch_range=batch_range,
                        compiled_batch=None if batch_size is None else min(max(batch_size, lo), hi),
                        compiled=compile, freezing=compile, capture_kernels=compile, require_int8=compile,
                        kernel_note=("int8 PT2E, not run yet (its kernels are read from the compiled code on the first call)"
                                     if compile else "fp32 (PT2E q/dq reference graph, eager: int8 weights dequantised)"))

