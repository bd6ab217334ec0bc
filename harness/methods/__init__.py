"""Accelerator families: each turns a methods.yaml entry into a Sampler."""

from __future__ import annotations

from harness.registry import Registry

FAMILIES: Registry = Registry("method family", "harness.methods.base:Sampler")
FAMILIES.add("solver", "harness.methods.family_solver:SolverSampler")
FAMILIES.add("stitch", "harness.methods.family_stitch:StitchSampler")
FAMILIES.add("student", "harness.methods.family_student:StudentSampler")
FAMILIES.add("jacobi", "harness.methods.family_jacobi:JacobiSampler")
FAMILIES.add("quantized", "harness.methods.family_quantized:QuantizedSampler")


def make_sampler(spec: dict):
    """Build the Sampler for one validated methods.yaml entry."""
    return FAMILIES.get(spec["family"])(spec)
