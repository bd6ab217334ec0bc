"""Metrics: one small module per metric family, registered by name."""

from __future__ import annotations

from harness.registry import Registry

METRICS: Registry = Registry("metric", "harness.metrics.base:Metric")
METRICS.add("fid", "harness.metrics.fidelity:FID")
METRICS.add("kid", "harness.metrics.fidelity:KID")
METRICS.add("is", "harness.metrics.fidelity:InceptionScore")
METRICS.add("precision", "harness.metrics.fidelity:Precision")
METRICS.add("recall", "harness.metrics.fidelity:Recall")
METRICS.add("class_acc", "harness.metrics.fidelity:ClassAccuracy")
METRICS.add("exact_err", "harness.metrics.reference:ExactError")
METRICS.add("mse_ref", "harness.metrics.reference:MSEToReference")
METRICS.add("wall_s_per_sample", "harness.metrics.cost:WallPerSample")
METRICS.add("peak_mem_mb", "harness.metrics.cost:PeakMemory")
METRICS.add("gflops_per_sample", "harness.metrics.cost:GFLOPsPerSample")
METRICS.add("clip_score", "harness.metrics.clip_score:CLIPScore")
METRICS.add("clap_score", "harness.metrics.clap_score:CLAPScore")
METRICS.add("cmmd", "harness.metrics.cmmd:CMMD")
METRICS.add("fd_dinov2", "harness.metrics.fd_dinov2:FDDINOv2")
METRICS.add("mse_fp32", "harness.metrics.quantized:MSEToFullPrecision")
METRICS.add("model_bytes", "harness.metrics.quantized:ModelBytes")
METRICS.add("int8_kernels", "harness.metrics.quantized:Int8Kernels")
