"""harness.quantization on a small random class-conditional UNet2DModel (and a toy net for the peer check).

The one compiled w8a8 graph is built once per module (about 10-35 s on two busy cores); everything
else runs eager. Compiled w8 is marked slow. Error bounds are for random-initialised weights, whose
activations have no structure to exploit: PT2E w8a8 measured 4.6 % relative error here, so the
stated bound is 10 %.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchao")

import harness.quantization as Q
from harness.errors import ConfigError, StepbenchError
from harness.quantization.base import graph_tensors
from harness.quantization.simulate import first_and_last

W8A8_MAX_REL_ERR = 0.10


def small_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, num_class_embeds=11, attention_head_dim=8).eval()


def calibration_set(kind="uniform", n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 8, 8, generator=g), t, torch.randint(0, 11, (4,), generator=g))
            for t in Q.calibration_timesteps(kind, 1000, n, seed)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def unet():
    return small_unet()


@pytest.fixture(scope="module")
def calibration():
    return calibration_set()


@pytest.fixture(scope="module")
def probe(unet):
    g = torch.Generator().manual_seed(2)
    x, t, c = torch.randn(7, 1, 8, 8, generator=g), torch.linspace(5, 995, 7), torch.randint(0, 11, (7,), generator=g)
    with torch.no_grad():
        ref = unet(x, t, class_labels=c).sample
    return x, t, c, ref


@pytest.fixture(scope="module")
def w8a8_compiled(unet, calibration, probe):
    torch.set_num_threads(2)
    q = Q.quantize(unet, "w8a8", calibration, progress=False)
    x, t, c, _ = probe
    out5 = q(x[:5], t[:5], c[:5])  # compiles, for batch 5
    return q, out5


@pytest.fixture(scope="module")
def w8a8_eager(unet, calibration):
    return Q.quantize(unet, "w8a8", calibration, progress=False, compile=False)


# --- w8a8 ---------------------------------------------------------------------------------------

def test_w8a8_holds_int8_weights_and_leaves_the_output_fp32(w8a8_eager, unet):
    gm = w8a8_eager.module
    int8 = [t for t in graph_tensors(gm) if t.dtype == torch.int8]
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(int8) == len(layers) == 51  # every conv and linear, first and last included (both papers at W8A8)
    # the network output comes straight from the last convolution, not from a dequantize
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    last = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    assert "conv2d" in str(last.target) and "dequantize" not in str(last.target)
    # fp32 weights are not counted: size is int8 weights + scales + fp32 rest, well under fp32's
    assert w8a8_eager.size_bytes() < 0.35 * Q.fp32_size_bytes(unet)
    assert w8a8_eager.size_bytes() > sum(t.numel() for t in int8)


def test_w8a8_compiled_graph_runs_onednn_int8_kernels(w8a8_compiled):
    q, _ = w8a8_compiled
    assert q.kernels["onednn.qconv_pointwise"] + q.kernels["onednn.qconv2d_pointwise"] >= 20
    assert q.kernels["onednn.qlinear_pointwise"] >= 10
    assert "mkldnn._convolution_pointwise" not in q.kernels  # no convolution left in fp32
    assert q.precision().startswith("int8 (")
    rec = q.record()
    assert rec["simulated"] is False and rec["compiled_batch"] == 5 and rec["size_bytes"] == q.size_bytes()


def test_w8a8_error_is_nonzero_and_bounded(w8a8_compiled, w8a8_eager, probe):
    _, out5 = w8a8_compiled
    x, t, c, ref = probe
    err = rel(out5, ref[:5])
    assert 1e-3 < err < W8A8_MAX_REL_ERR, err
    eager = w8a8_eager(x[:5], t[:5], c[:5])
    assert 1e-3 < rel(eager, ref[:5]) < W8A8_MAX_REL_ERR
    # the int8 kernels implement the reference q/dq graph up to their own rounding (requantised outputs)
    assert rel(out5, eager) < 0.05


def test_w8a8_rows_do_not_depend_on_batch_padding(w8a8_compiled, probe):
    q, out5 = w8a8_compiled
    x, t, c, _ = probe
    out7 = q(x, t, c)  # chunks of the compiled batch 5: rows 5-6 run padded with copies of row 6
    assert out7.shape == (7, 1, 8, 8)
    assert torch.equal(out7[:5], out5)
    out_shifted = q(x[2:7], t[2:7], c[2:7])
    torch.testing.assert_close(out7[5:], out_shifted[3:], rtol=0, atol=1e-5)


def test_w8a8_calibration_is_deterministic_and_depends_on_its_inputs(unet, calibration, w8a8_eager, probe):
    again = Q.quantize(unet, "w8a8", calibration, progress=False, compile=False)
    a, b = w8a8_eager.artifact.tensors, again.artifact.tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, c, _ = probe
    assert torch.equal(w8a8_eager.module(x[:4], t[:4], c[:4]), again.module(x[:4], t[:4], c[:4]))
    other = Q.quantize(unet, "w8a8", calibration_set("ptq4dm_normal", n=2), progress=False, compile=False)
    assert not all(torch.equal(a[k], other.artifact.tensors[k]) for k in a)


def test_w8a8_artifact_rebuilds_bit_identical_outputs(tmp_path, unet, w8a8_eager, probe):
    path = Q.save_artifact(tmp_path / "w8a8.safetensors", w8a8_eager.artifact)
    from safetensors import safe_open  # the file is plain safetensors: no pickle anywhere

    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(w8a8_eager.artifact.tensors)
    art = Q.load_artifact(path)
    assert art.meta["scheme"] == "w8a8" and art.meta["calibration_inputs"] == 4
    rebuilt = Q.rebuild(unet, art, compile=False)
    x, t, c, _ = probe
    assert torch.equal(rebuilt.module(x[:4], t[:4], c[:4]), w8a8_eager.module(x[:4], t[:4], c[:4]))
    with pytest.raises(StepbenchError, match="another network"):
        Q.rebuild(small_unet(seed=1), art, compile=False)


def test_fp32_modules_stay_fp32(unet, calibration):
    q = Q.quantize(unet, "w8a8", calibration[:1], fp32_modules=("conv_in", "conv_out"), progress=False, compile=False)
    assert sum(t.dtype == torch.int8 for t in graph_tensors(q.module)) == 49
    with pytest.raises(ConfigError, match="not a module"):
        Q.quantize(unet, "w8a8", calibration, fp32_modules=("conv_inn",), compile=False)


# --- w8 -----------------------------------------------------------------------------------------

def test_w8_quantises_linears_only_and_counts_their_bytes(unet, probe):
    from torchao.quantization import Int8Tensor

    q = Q.quantize(unet, "w8", compile=False)
    linears = {n: m for n, m in q.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears.values())
    assert all(type(m.weight) is torch.nn.Parameter for m in q.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert type(unet.time_embedding.linear_1.weight) is torch.nn.Parameter  # the caller's network is untouched
    # size: fp32 size minus the linear weights' 4 bytes, plus int8 weights, fp32 per-row scales and int8 zero points
    lin_w = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    expected = Q.fp32_size_bytes(unet) - sum(4 * w.numel() for w in lin_w) + sum(w.numel() + 5 * w.shape[0] for w in lin_w)
    assert q.size_bytes() == expected
    x, t, c, ref = probe
    assert 1e-4 < rel(q(x, t, c), ref) < 0.02
    assert q.record()["precision"].startswith("fp32 math on int8-stored Linear weights")


@pytest.mark.slow
def test_w8_compiled_reads_int8_weights(unet, probe):
    q = Q.quantize(unet, "w8")
    x, t, c, ref = probe
    assert 1e-4 < rel(q(x, t, c), ref) < 0.02
    assert "mkl._mkl_linear" not in q.kernels  # freezing would have folded the weights back to fp32


# --- simulate -----------------------------------------------------------------------------------

def test_simulated_w4a8_is_worse_than_w8a8_and_keeps_first_last_at_8bit(unet, calibration, probe):
    x, t, c, ref = probe
    s8 = Q.quantize(unet, "w8a8", calibration, simulate=True, progress=False)
    s4 = Q.quantize(unet, "w4a8", calibration, simulate=True, progress=False)
    e8, e4 = rel(s8(x, t, c), ref), rel(s4(x, t, c), ref)
    assert 1e-3 < e8 < W8A8_MAX_REL_ERR and e4 > 2 * e8, (e8, e4)
    layers = s4.artifact.meta["layers"]
    assert layers["conv_in"]["w_bits"] == layers["conv_out"]["w_bits"] == 8
    assert {v["w_bits"] for k, v in layers.items() if k not in ("conv_in", "conv_out")} == {4}
    assert s4.record()["simulated"] is True and s4.precision().startswith("fp32 (simulated w4a8")
    assert s4.size_bytes() < s8.size_bytes() < Q.fp32_size_bytes(unet)


def test_first_and_last_are_found_by_data_flow(unet, calibration):
    # registration order would say time_embedding.linear_1 (UNet2DModel runs it before conv_in)
    x, t, c = Q.as_inputs(*calibration[0])
    assert first_and_last(unet, (x, t, c)) == ("conv_in", "conv_out")


def test_simulated_artifact_rebuilds_bit_identical(tmp_path, unet, calibration, probe):
    s4 = Q.quantize(unet, "w4a8", calibration, simulate=True, progress=False)
    art = Q.load_artifact(Q.save_artifact(tmp_path / "w4a8.safetensors", s4.artifact))
    rebuilt = Q.rebuild(unet, art)
    x, t, c, _ = probe
    assert torch.equal(rebuilt(x, t, c), s4(x, t, c))


class Toy(torch.nn.Module):
    """conv -> relu -> linear: PT2E's x86 quantizer and the simulation quantise the same tensors
    (the conv's input, the linear's input, both weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8 * 8 * 8, 64)

    def forward(self, x, t, class_labels=None):
        return self.lin(torch.relu(self.conv(x)).flatten(1)).view(-1, 1, 8, 8)


def test_simulated_w8a8_matches_torchao_pt2e_reference_graph():
    net = Toy().eval()
    g = torch.Generator().manual_seed(4)
    cal = [(torch.randn(6, 1, 8, 8, generator=g), 0.0, None) for _ in range(5)]
    x = torch.randn(6, 1, 8, 8, generator=g)
    pt2e = Q.quantize(net, "w8a8", cal, progress=False, compile=False)  # q/dq reference graph, eager
    sim = Q.quantize(net, "w8a8", cal, simulate=True, keep_8bit=(), progress=False)
    with torch.no_grad():
        ref = net(x, 0.0)
    a, b = pt2e(x, 0.0), sim(x, 0.0)
    assert rel(a, ref) > 1e-3  # quantisation happened
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="keep_8bit"):  # its output comes from a view, not from a layer
        Q.quantize(net, "w4a8", cal, simulate=True, progress=False)


def test_fake_quant_equals_hand_formula():
    """torch's fake-quant op against the textbook formula, per channel at 4 bits (the op is what
    simulate uses; this pins its rounding and clamping)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 10, generator=g)
    scale = w.abs().amax(1) / 7.5
    zp = torch.zeros(6, dtype=torch.int32)
    hand = torch.clamp(torch.round(w / scale[:, None]), -8, 7) * scale[:, None]
    torch.testing.assert_close(torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -8, 7), hand, rtol=0, atol=1e-6)


# --- time steps and bad input -------------------------------------------------------------------

def test_calibration_timesteps():
    assert Q.calibration_timesteps("uniform", 1000, 5, 0) == [0, 250, 500, 749, 999]
    a = Q.calibration_timesteps("ptq4dm_normal", 1000, 20000, 7)
    assert a == Q.calibration_timesteps("ptq4dm_normal", 1000, 20000, 7)
    assert a != Q.calibration_timesteps("ptq4dm_normal", 1000, 20000, 8)
    assert min(a) == 0 and max(a) == 999
    # N(0.4T, 0.4T) truncated toward 0 and clipped: P(t = 0) = P(z < 1/T) ~ Phi(-1 + 1/400)
    p0 = sum(v == 0 for v in a) / len(a)
    assert abs(p0 - 0.5 * math.erfc((1 - 1 / 400) / math.sqrt(2))) < 0.01
    # the unclipped part: t = floor(zT) for z in [1/T, (T-1)/T), a truncated normal's mean less 1/2
    Phi, phi = (lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))), (lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi))
    lo, hi = (0.001 - 0.4) / 0.4, (0.999 - 0.4) / 0.4
    mean = 1000 * (0.4 + 0.4 * (phi(lo) - phi(hi)) / (Phi(hi) - Phi(lo))) - 0.5  # 457.7
    inner = [v for v in a if 0 < v < 999]
    assert abs(sum(inner) / len(inner) - mean) < 5  # its standard error is about 2
    with pytest.raises(ConfigError, match="did you mean 'uniform'"):
        Q.calibration_timesteps("unifrom", 1000, 5, 0)


def test_bad_input_is_one_line(unet, calibration, w8a8_eager, probe):
    for call, match in [(lambda: Q.quantize(unet, "w9"), "unknown"),
                        (lambda: Q.quantize(unet, "w4a8"), "simulate: true"),
                        (lambda: Q.quantize(unet, "w8a8", None), "needs calibration"),
                        (lambda: Q.quantize(unet, "w4a9", calibration, simulate=True), "2 <= N, M <= 8"),
                        (lambda: Q.quantize(unet, "fp8"), "needs CUDA")]:
        with pytest.raises(ConfigError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    x, t, _, _ = probe
    with pytest.raises(StepbenchError, match="class-conditional"):
        w8a8_eager(x, t)


# --- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["w8", "w8a8", "fp8"])
def test_cuda_torchao_configs(scheme, probe):
    net = small_unet().cuda()
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no float8 on this GPU")
    q = Q.quantize(net, scheme)
    x, t, c, ref = (v.cuda() for v in probe)
    out = q(x, t, c)
    assert 1e-5 < rel(out, ref) < 0.1
    assert q.size_bytes() < Q.fp32_size_bytes(net)
    assert q.kernels  # the compiled code was captured
