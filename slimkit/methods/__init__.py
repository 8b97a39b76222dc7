"""Quantization methods: each is a small function over a model already wrapped and calibrated.

A method receives the quantized model, its float twin, the calibration tensor, the config and the device,
does its optimisation, and returns per-block statistics for the report.
"""
from . import adaround, brecq, minmax, os_plus, outlier_suppression, qdrop, rtn, smoothquant

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

# Transformer methods (slimkit.transformer): a function-preserving transform per block, then calibration.
TRANSFORMER_METHODS = {
    "minmax": minmax.METHOD,
    "smoothquant": smoothquant.METHOD,
    "outlier_suppression": outlier_suppression.METHOD,
    "os_plus": os_plus.METHOD,
}
DESCRIPTIONS.update({name: m.description for name, m in TRANSFORMER_METHODS.items()})
