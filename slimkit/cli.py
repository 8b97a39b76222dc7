"""The `slimkit` command: sub-commands mirror the library's verbs (quantize, eval)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import SlimkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimkit: make neural networks smaller and faster.")
console = Console(stderr=True)

MODEL_HELP = ("a shipped model name (fmnist-resnet, efficientnet-lite0, smollm2-135m, minilm-l6), a directory written "
              "by `slimkit quantize`, a Hugging Face model directory, or a factory 'file.py:function' returning an nn.Module")


def _methods_help() -> str:
    from .methods import DESCRIPTIONS

    return "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())


def load_any(model: str, weights: Optional[Path] = None):
    """(model, is_artifact): a saved artifact directory, or a float model built by name or factory."""
    from .io.artifact import load
    from .models.registry import get_model

    path = Path(model)
    if path.is_dir() and (path / "manifest.json").exists():
        return load(model), True
    if path.is_dir() and (path / "config.json").exists():  # a Hugging Face model directory
        from .models.hf import load_hf

        return load_hf(path)[0], False
    if path.is_dir():
        raise SlimkitError(f"{model} is not a slimkit artifact (no manifest.json) and not a Hugging Face model "
                           "directory (no config.json)")
    return get_model(model, weights=weights), False


def text_data(name: str) -> list[str]:
    """Evaluation / calibration text: a shipped corpus name, a file or a folder."""
    from .models import TEXT_DATASETS
    from .models.registry import get_dataset
    from .text import read_texts

    return get_dataset(name) if name in TEXT_DATASETS else read_texts(name)


def lm_rows(fp_model, qmodel, eval_name: str, dev, quiet: bool, max_tokens: int) -> dict:
    """FP and quantized rows of the report for a transformer (perplexity or embedding cosine)."""
    from .lm_eval import embed, evaluate_lm, lm_kind
    from .text import encode_batch, sentences

    texts = text_data(eval_name)
    tok = getattr(qmodel, "_slimkit_tokenizer", None) or getattr(fp_model, "_slimkit_tokenizer", None)
    if tok is None:
        raise SlimkitError("this transformer has no tokenizer: save its tokenizer files in the model directory")
    kw = dict(max_tokens=max_tokens, device=dev, progress=not quiet)
    if lm_kind(fp_model) == "causal":
        return {"FP": evaluate_lm(fp_model, texts, tok, **kw), "quantized": evaluate_lm(qmodel, texts, tok, **kw)}
    # encoder: cosine of the quantized embeddings to the float ones (1 for the float model itself)
    ref = embed(fp_model, encode_batch(tok, sentences(texts, 256, at_least=16), max_len=128))
    fp = {**evaluate_lm(fp_model, texts, tok, **kw), "cosine": 1.0}
    return {"FP": fp, "quantized": evaluate_lm(qmodel, texts, tok, reference_embeddings=ref, **kw)}


@app.command(help="Quantize MODEL with calibration data and save it to --out.\n\nMethods: " + _methods_help())
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the quantized model to"),
    method: Optional[str] = typer.Option(None, help="CNNs: rtn | adaround | brecq | qdrop (default qdrop); "
                                                    "transformers: minmax | smoothquant | outlier_suppression | os_plus"),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="weight bits, 2..8 (default 4)"),
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="activation bits, 2..8 (default 4)"),
    calib: Optional[str] = typer.Option(None, help="calibration data: .safetensors/.npy/.npz file or shipped dataset name "
                                                   "(default: the shipped model's calibration set)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="data to evaluate FP and quantized models on"),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe: any of the options below as fields"),
    preset: Optional[str] = typer.Option(None, help="paper (20000 iters/block) | demo (1000) | fast (100, for smoke tests)"),
    iters: Optional[int] = typer.Option(None, help="reconstruction iterations per block"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="calibration samples (default 1024)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="reconstruction batch size (default 32)"),
    drop_prob: Optional[float] = typer.Option(None, "--drop-prob", help="QDrop: probability of keeping activation quantization (0.5)"),
    w_observer: Optional[str] = typer.Option(None, "--w-observer", help="minmax | ema | mse | percentile"),
    a_observer: Optional[str] = typer.Option(None, "--a-observer", help="minmax | ema | mse | percentile"),
    w_granularity: Optional[str] = typer.Option(None, "--w-granularity", help="channel | tensor | group"),
    first_last_bits: Optional[int] = typer.Option(None, "--first-last-bits", help="bits of the first and last layer (8; 0: same as the rest)"),
    weights: Optional[Path] = typer.Option(None, help="safetensors state dict for a factory-built model"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    seed: Optional[int] = typer.Option(None, help="random seed (0)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="transformers: tokens per calibration sequence (2048)"),
    a_granularity: Optional[str] = typer.Option(None, "--a-granularity", help="tensor (static) | token (dynamic)"),
    attn_quant: Optional[bool] = typer.Option(None, "--attn-quant/--no-attn-quant",
                                              help="transformers: also quantize the attention matmul inputs"),
    max_tokens: int = typer.Option(20000, "--max-tokens", help="transformers: evaluation tokens for perplexity"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    from . import quantize as run_quantize
    from .config import QuantConfig
    from .core.data import resolve
    from .eval import evaluate, predict
    from .io.artifact import save
    from .models.registry import default_data
    from .report import print_table

    if out.exists() and not overwrite:
        raise SlimkitError(f"{out} already exists: choose another --out or pass --overwrite")
    options = dict(method=method, w_bits=w_bits, a_bits=a_bits, preset=preset, iters=iters, num_samples=num_samples,
                   batch_size=batch_size, drop_prob=drop_prob, w_observer=w_observer, a_observer=a_observer,
                   w_granularity=w_granularity, first_last_bits=first_last_bits, device=device, seed=seed,
                   seq_len=seq_len, a_granularity=a_granularity, attn_quant=attn_quant,
                   progress=False if quiet else None)
    options = {k: v for k, v in options.items() if v is not None}
    QuantConfig.build(recipe, **options)  # fail on bad options before loading anything
    fp_model, is_artifact = load_any(model, weights)
    if is_artifact:
        raise SlimkitError(f"{model} is already quantized: give the float model")
    from .transformer import is_transformer

    lm = is_transformer(fp_model)
    if lm and calib is not None:
        calib = text_data(calib)
    calib = calib or default_data(model, "calib")
    if lm and isinstance(calib, str):
        calib = text_data(calib)
    if calib is None:
        raise SlimkitError("give calibration data with --calib (a .safetensors/.npy/.npz file or a shipped dataset)")
    t0 = time.perf_counter()
    qmodel = run_quantize(fp_model, calib, recipe=recipe, **options)
    seconds = time.perf_counter() - t0
    rows = {}
    eval_name = eval_data or default_data(model, "eval")
    if lm and eval_name is not None:
        rows = lm_rows(fp_model, qmodel, eval_name, qmodel.slimkit_info["device"], quiet, max_tokens)
        rows["FP"]["seconds"] = None
    elif eval_name is not None:
        x, y = resolve(eval_name)
        dev = qmodel.slimkit_info["device"]
        ref = predict(fp_model, x, device=dev, progress=not quiet, desc="evaluating FP")
        rows["FP"] = evaluate(fp_model, x, y, reference=ref, device=dev)
        rows["quantized"] = evaluate(qmodel, x, y, reference=ref, device=dev, progress=not quiet)
        rows["FP"]["seconds"] = None
    else:
        from .eval import model_size_bytes

        rows = {"FP": {"size_bytes": model_size_bytes(fp_model)}, "quantized": {"size_bytes": model_size_bytes(qmodel)}}
    rows["quantized"]["seconds"] = seconds
    metrics = {"fp": rows["FP"], "quantized": rows["quantized"], "eval_data": eval_name}
    save(qmodel, out, overwrite=overwrite, metrics=metrics)
    info = qmodel.slimkit_info
    cfg = info["config"]
    a = cfg["a_bits"] if cfg["a_bits"] is not None else "16"
    print_table(rows, title=f"{info['method']} W{cfg['w_bits']}A{a} on {model}", console=Console())
    Console().print(f"saved to {out}")


@app.command(name="eval", help="Evaluate a model or a saved quantized model: top-1 accuracy (with labels) and "
                               "fidelity to the full-precision model (top-1 agreement, KL).")
def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help="evaluation data (default: the shipped model's evaluation set)"),
    reference: Optional[str] = typer.Option(None, help="the full-precision model to compare with (default: the one a "
                                                       "saved artifact was made from, when slimkit can build it)"),
    weights: Optional[Path] = typer.Option(None, help="safetensors state dict for a factory-built model"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_tokens: int = typer.Option(20000, "--max-tokens", help="transformers: evaluation tokens for perplexity"),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    from .core.data import resolve
    from .eval import evaluate
    from .models.registry import default_data, get_model
    from .quantize import pick_device
    from .report import print_table

    dev = pick_device(device)
    m, is_artifact = load_any(model, weights)
    from .transformer import is_transformer

    if is_transformer(m):
        return _eval_lm(m, model, data, reference, dev, quiet, max_tokens)
    spec = getattr(m, "_slimkit_spec", None) if is_artifact else None
    builder = spec["builder"] if spec else model
    data = data or default_data(builder, "eval")
    if data is None:
        raise SlimkitError("give evaluation data with --data (a .safetensors/.npy/.npz file or a shipped dataset)")
    x, y = resolve(data)
    ref_model = None
    if reference is not None:
        ref_model, _ = load_any(reference)
    elif is_artifact and spec:
        ref_model = get_model(spec["builder"], **spec.get("kwargs", {}))
    metrics = evaluate(m, x, y, reference=ref_model, device=dev, progress=not quiet)
    if y is None and ref_model is None:
        console.print("[yellow]no labels and no reference model: only size is reported[/]")
    print_table({Path(model).name or model: metrics}, title=f"eval on {data}", console=Console())


def _eval_lm(m, model: str, data: Optional[str], reference: Optional[str], dev, quiet: bool, max_tokens: int) -> None:
    """`slimkit eval` for a transformer: perplexity (causal LMs) or embedding cosine to the float model (encoders)."""
    from .lm_eval import evaluate_lm, lm_kind
    from .models.hf import load_hf
    from .models.registry import default_data
    from .report import print_table

    spec = getattr(m, "slimkit_info", {}).get("model_spec") or {}
    source = spec.get("hf") if isinstance(spec, dict) else None
    data = data or default_data(source or model, "eval")
    if data is None:
        raise SlimkitError("give evaluation text with --data (a text file, a folder, or python-docs-eval)")
    tok = getattr(m, "_slimkit_tokenizer", None)
    if tok is None:
        raise SlimkitError(f"{model} has no tokenizer files: save the tokenizer in the model directory")
    ref = None
    if lm_kind(m) == "encoder":
        if reference is None and source is None:
            raise SlimkitError("embedding cosine needs the float model: pass --reference MODEL")
        ref = load_any(reference)[0] if reference is not None else load_hf(source)[0]
    metrics = evaluate_lm(m, text_data(data), tok, reference=ref, max_tokens=max_tokens, device=dev, progress=not quiet)
    print_table({Path(model).name or model: metrics}, title=f"eval on {data}", console=Console())


def main() -> None:
    """Entry point: bad input prints one line and exits with code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except (SlimkitError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
