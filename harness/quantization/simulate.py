"""`simulate: true`: fake-quant for bit widths without a fast kernel here (W4A8, as PTQ4DM and
Q-Diffusion report). fp32 kernels compute on quantise-dequantised tensors, so it measures quality,
never speed.

As Q-Diffusion's release configuration (`scale_method: max`, channel-wise weights, per-tensor
activations): every nn.Conv2d and nn.Linear gets its weight fake-quantised per output channel
(symmetric, min/max range: torchao's PerChannelMinMaxObserver) and its input fake-quantised per
tensor (affine, range calibrated with torchao's HistogramObserver on the fp32 network, the
observer PT2E's w8a8 uses). Attention's matmuls and the network output stay fp32. First and last
layer (the one reading x_t and the one writing the output) keep 8-bit weights at any bit width,
as PTQ4DM's `set_first_last_layer_to_8bit`. No BRECQ/AdaRound/QDrop reconstruction: W4 results
here are what plain rounding gives, a lower bound on the papers' reconstructed numbers.

The quantise-dequantise itself is torch's maintained op (torch.fake_quantize_per_channel_affine /
_per_tensor_affine); what is written here is only the module swap and the bookkeeping. A test
checks it against torchao's PT2E reference graph on a network where both quantise the same tensors.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.errors import ConfigError
from harness.quantization.base import Artifact, QuantizedNet, TensorNet, net_sha256

EPS = 2**-12  # the x86 PT2E config's observer eps, so simulated W8A8 ranges match real w8a8's
LAYERS = (torch.nn.Conv2d, torch.nn.Linear)


class FakeQuantLayer(torch.nn.Module):
    """A Conv2d/Linear whose input and weight pass through fake-quant; while `calibrating` it
    records its input range and computes in fp32."""

    def __init__(self, layer: torch.nn.Module, w_bits: int, a_bits: int | None):
        from torchao.quantization.pt2e import HistogramObserver, PerChannelMinMaxObserver

        super().__init__()
        self.layer, self.w_bits, self.a_bits = layer, w_bits, a_bits
        self.w_range = (-(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1)
        self.a_range = (0, 2**a_bits - 1) if a_bits else None
        w_obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.int8, quant_min=self.w_range[0], quant_max=self.w_range[1],
                                         qscheme=torch.per_channel_symmetric, eps=EPS)
        w_obs(layer.weight.detach())
        scale, zp = w_obs.calculate_qparams()
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("w_zp", zp.to(torch.int32))
        self.act_observer = (HistogramObserver(dtype=torch.uint8, quant_min=0, quant_max=self.a_range[1],
                                               qscheme=torch.per_tensor_affine, eps=EPS) if a_bits else None)
        self.register_buffer("a_scale", torch.ones(1))
        self.register_buffer("a_zp", torch.zeros(1, dtype=torch.int32))
        self.calibrating = bool(a_bits)
        self.weight_fq = None

    def finish_calibration(self, a_scale=None, a_zp=None) -> None:
        """Fix the activation range (from the observer, or given) and fake-quantise the weight once."""
        if self.a_bits:
            if a_scale is None:
                a_scale, a_zp = self.act_observer.calculate_qparams()
            self.a_scale = a_scale.reshape(1).float().to(self.a_scale.device)
            self.a_zp = a_zp.reshape(1).to(torch.int32).to(self.a_zp.device)
        self.weight_fq = torch.fake_quantize_per_channel_affine(
            self.layer.weight.detach(), self.w_scale, self.w_zp, 0, *self.w_range)
        self.calibrating = False
        self.act_observer = None  # its histogram is not needed any more

    def forward(self, x):
        if self.calibrating:
            self.act_observer(x.detach())
            return self.layer(x)
        if self.a_bits:
            x = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zp, *self.a_range)
        if isinstance(self.layer, torch.nn.Conv2d):
            return self.layer._conv_forward(x, self.weight_fq, self.layer.bias)
        return F.linear(x, self.weight_fq, self.layer.bias)

    def packed_bytes(self) -> int:
        """Weights at their bit width, one fp32 scale per channel (symmetric: zero points are 0),
        the activation's fp32 scale and int32 zero point, and the fp32 bias."""
        w = self.layer.weight
        bias = self.layer.bias
        return (-(-w.numel() * self.w_bits // 8) + 4 * self.w_scale.numel() + (8 if self.a_bits else 0)
                + (bias.numel() * bias.element_size() if bias is not None else 0))


def parse_bits(scheme: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"w(\d)(?:a(\d))?", scheme)
    if not m or not 2 <= int(m[1]) <= 8 or (m[2] and not 2 <= int(m[2]) <= 8):
        raise ConfigError(f"simulated quantization scheme {scheme!r}: expected wNaM or wN with 2 <= N, M <= 8 (e.g. w4a8)")
    return int(m[1]), int(m[2]) if m[2] else None


def first_and_last(net: torch.nn.Module, example: tuple) -> tuple[str, str]:
    """Names of the layer that reads the network input and the one whose output is the network's
    output, found by one fp32 forward with hooks (tensor identity), not by registration order:
    a UNet2DModel runs its time embedding's Linear before conv_in."""
    names = {m: n for n, m in net.named_modules() if isinstance(m, LAYERS)}
    x, t, c = example
    found, outputs = {}, []  # outputs keeps the tensors alive, so identity is not confused by a reused id()
    hooks = []

    def before(mod, inp, n):
        if inp and inp[0] is x:
            found.setdefault("first", n)

    def after(mod, inp, out, n):
        outputs.append((out, n))

    for m, n in names.items():  # hooks return None: they only look
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=n: before(mod, inp, n)))
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: after(mod, inp, out, n)))
    try:
        with torch.no_grad():
            out = TensorNet(net)(x, t, c)
    finally:
        for h in hooks:
            h.remove()
    last = [n for o, n in outputs if o is out]
    if "first" not in found or not last:
        raise ConfigError("simulate: cannot tell which Conv2d/Linear reads the network input and which writes its output; "
                          "pass keep_8bit=(first_name, last_name) or keep_8bit=()")
    return found["first"], last[0]


def simulate(net, scheme: str, calibration, *, keep_8bit=None, progress=True,
             qparams: Artifact | None = None) -> QuantizedNet:
    """Fake-quantised copy of `net` at `scheme` (e.g. 'w4a8', 'w8a8', 'w4'). `keep_8bit`: layer
    names whose weights stay 8-bit (None: the first and last layer). With `qparams` (an artifact)
    the calibrated ranges are loaded instead of observed."""
    w_bits, a_bits = parse_bits(scheme)
    net = net.eval()
    if keep_8bit is None:
        keep_8bit = first_and_last(net, calibration[0])
    qnet = copy.deepcopy(net)
    layers = {n: m for n, m in qnet.named_modules() if isinstance(m, LAYERS)}
    unknown = [k for k in keep_8bit if k not in layers]
    if unknown:
        raise ConfigError(f"keep_8bit: {unknown[0]!r} is not a Conv2d/Linear of this network")
    fq = {}
    for name, layer in layers.items():
        fq[name] = FakeQuantLayer(layer, max(w_bits, 8) if name in keep_8bit else w_bits, a_bits)
        parent, _, attr = name.rpartition(".")
        setattr(qnet.get_submodule(parent) if parent else qnet, attr, fq[name])
    runner = TensorNet(qnet)
    if qparams is None:
        if a_bits:  # weight-only: nothing to observe
            with torch.no_grad():
                for x, t, c in tqdm(calibration, desc=f"{scheme} calibration", disable=not progress, leave=False):
                    runner(x, t, c)
        for m in fq.values():
            m.finish_calibration()
    else:
        if set(qparams.meta["layers"]) != set(fq):
            raise ConfigError("simulated-quantization artifact does not fit this network's layers; recalibrate")
        for name, m in fq.items():
            m.finish_calibration(qparams.tensors.get(f"{name}.a_scale"), qparams.tensors.get(f"{name}.a_zp"))
    tensors = {}
    for name, m in fq.items():
        tensors[f"{name}.w_scale"] = m.w_scale.cpu()
        if a_bits:
            tensors[f"{name}.a_scale"], tensors[f"{name}.a_zp"] = m.a_scale.cpu(), m.a_zp.cpu()
    meta = {"scheme": scheme, "simulate": True, "net_sha256": net_sha256(net), "keep_8bit": list(keep_8bit),
            "layers": {n: {"w_bits": m.w_bits, "a_bits": m.a_bits} for n, m in fq.items()},
            "calibration_inputs": None if qparams is not None else len(calibration)}
    if qparams is not None:
        meta["calibration_inputs"] = qparams.meta.get("calibration_inputs")
    # the fake-quantised layers at their packed size, everything else (norms, embeddings) as it is
    inside = {id(v) for m in fq.values() for v in (*m.parameters(), *m.buffers())}
    rest = sum(v.numel() * v.element_size() for v in (*qnet.parameters(), *qnet.buffers()) if id(v) not in inside)
    nominal = rest + sum(m.packed_bytes() for m in fq.values())
    kept = f"; 8-bit weights kept in {', '.join(keep_8bit)}" if keep_8bit and w_bits < 8 else ""
    note = f"fp32 (simulated {scheme}: fake-quant of {len(fq)} Conv2d/Linear{kept})"
    return QuantizedNet(runner=runner, scheme=scheme, simulated=True, module=qnet, artifact=Artifact(tensors, meta),
                        conditional=None, kernel_note=note, nominal_size=nominal)
