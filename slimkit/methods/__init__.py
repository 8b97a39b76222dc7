"""Quantization methods: each is a small function over a model already wrapped and calibrated.

A method receives the quantized model, its float twin, the calibration tensor, the config and the device,
does its optimisation, and returns per-block statistics for the report.
"""
from . import adaround, brecq, qdrop, rtn

METHODS = {
    "rtn": rtn.run,
    "adaround": adaround.run,
    "brecq": brecq.run,
    "qdrop": qdrop.run,
}

DESCRIPTIONS = {
    "rtn": "round-to-nearest with min-max or MSE observers, no optimisation",
    "adaround": "layer-wise AdaRound: learned weight rounding, activations in float during reconstruction",
    "brecq": "block reconstruction: AdaRound weights + learned activation steps, quantized block inputs",
    "qdrop": "BRECQ with activation quantization randomly dropped (element-wise, probability 0.5)",
}
