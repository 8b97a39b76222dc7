"""The `slimkit` command: sub-commands mirror the library's verbs (quantize, eval)."""
from __future__ import annotations

import os
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

        if weights is not None:
            raise SlimkitError(f"--weights is for models built by name or factory; {model} is a Hugging Face folder "
                               "that holds its own weights: drop --weights")
        return load_hf(path)[0], False
    if path.is_dir():
        raise SlimkitError(f"{model} is not a slimkit artifact (no manifest.json) and not a Hugging Face model "
                           "directory (no config.json)")
    return get_model(model, weights=weights), False


def shipped_name(model: str, m, is_artifact: bool) -> str:
    """The shipped model behind MODEL, for its default data: an artifact's recorded builder or Hugging Face
    name, else MODEL itself."""
    spec = getattr(m, "_slimkit_spec", None) if is_artifact else None
    if isinstance(spec, dict) and isinstance(spec.get("builder") or spec.get("hf"), str):
        return spec.get("builder") or spec["hf"]
    return model


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
    a_bits: Optional[int] = typer.Option(None, "--a-bits", help="activation bits, 2..8 (default 4; 0: weight-only, "
                                         "activations stay float)"),
    calib: Optional[str] = typer.Option(None, help="calibration data: for a CNN a .safetensors/.npy/.npz file or shipped "
                                                   "dataset name; for a transformer text (a file, a folder or a shipped "
                                                   "corpus, tokenised with the model folder's tokenizer) (default: the "
                                                   "shipped model's calibration set)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="data to evaluate FP and quantized models on"),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe: fields of slimkit.QuantConfig (the method "
                                                    "options below, e.g. w_bits, iters; not the model, data or output "
                                                    "arguments); options given here override it"),
    preset: Optional[str] = typer.Option(None, help="paper (20000 iters/block) | demo (500) | fast (100, for smoke tests); "
                                                     "sets defaults: a recipe's own values and other options win"),
    iters: Optional[int] = typer.Option(None, help="reconstruction iterations per block"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="calibration samples (default 1024 images; 128 text sequences for transformers)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="reconstruction batch size (default 32)"),
    drop_prob: Optional[float] = typer.Option(None, "--drop-prob", help="QDrop: probability of keeping activation quantization (0.5)"),
    w_observer: Optional[str] = typer.Option(None, "--w-observer", help="minmax | ema | mse | percentile"),
    a_observer: Optional[str] = typer.Option(None, "--a-observer", help="minmax | ema | mse | percentile"),
    w_granularity: Optional[str] = typer.Option(None, "--w-granularity", help="channel | tensor | group"),
    w_group_size: Optional[int] = typer.Option(None, "--w-group-size",
                                               help="weights per group with --w-granularity group (128)"),
    skip: Optional[list[str]] = typer.Option(None, "--skip", help="a layer (module path) to keep in float; repeatable"),
    first_last_bits: Optional[int] = typer.Option(None, "--first-last-bits", help="bits of the first and last layer (8; 0: same as the rest)"),
    weights: Optional[Path] = typer.Option(None, help="safetensors state dict for a factory-built model"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    seed: Optional[int] = typer.Option(None, help="random seed (0)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="transformers: tokens per calibration sequence "
                                                                  "(2048 for causal LMs, 128 for encoders; at most the "
                                                                  "model's context)"),
    a_granularity: Optional[str] = typer.Option(None, "--a-granularity", help="tensor (static) | token (dynamic)"),
    attn_quant: Optional[bool] = typer.Option(None, "--attn-quant/--no-attn-quant",
                                              help="transformers: also quantize the attention matmul inputs"),
    token_clipping: Optional[bool] = typer.Option(None, "--token-clipping/--no-token-clipping",
                                                  help="os_plus: activation ranges by token-wise clipping"),
    max_tokens: int = typer.Option(20000, "--max-tokens", min=1,
                                   help="transformers: evaluation tokens for perplexity"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    from . import quantize as run_quantize
    from .config import QuantConfig
    from .core.data import resolve
    from .eval import check_data, evaluate, predict
    from .io.artifact import check_output, save
    from .models.registry import default_data
    from .report import print_table

    check_output(out, overwrite)      # before any work: a bad --out fails at once
    options = dict(method=method, w_bits=w_bits, a_bits=a_bits, preset=preset, iters=iters, num_samples=num_samples,
                   batch_size=batch_size, drop_prob=drop_prob, w_observer=w_observer, a_observer=a_observer,
                   w_granularity=w_granularity, w_group_size=w_group_size, skip=skip or None,
                   first_last_bits=first_last_bits, device=device, seed=seed,
                   seq_len=seq_len, a_granularity=a_granularity, attn_quant=attn_quant,
                   token_clipping=token_clipping, progress=False if quiet else None)
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("a_bits") == 0:
        options["a_bits"] = None      # weight-only
    cfg = QuantConfig.build(recipe, **options)  # fail on bad options before loading anything
    fp_model, is_artifact = load_any(model, weights)
    from .core.wrap import quant_layers

    if is_artifact and quant_layers(fp_model):
        raise SlimkitError(f"{model} is already quantized: give the float model (or a sparse one from slimkit "
                           "sparsify)")
    if is_artifact and weights is not None:
        raise SlimkitError(f"{model} is a saved artifact that holds its own weights: drop --weights")
    from .quantize import check_unread
    from .transformer import is_transformer

    if not is_transformer(fp_model):
        given = [flag for flag, value in (("--seq-len", seq_len), ("--attn-quant", attn_quant),
                                          ("--token-clipping", token_clipping)) if value is not None]
        if given:
            raise SlimkitError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to transformers; "
                               f"{model} is a CNN: drop {'it' if len(given) == 1 else 'them'}")
    check_unread(cfg, is_transformer(fp_model), strict=True)

    name = shipped_name(model, fp_model, is_artifact)     # a sparse artifact: its model's default data
    lm = is_transformer(fp_model)
    if lm and calib is not None:
        calib = text_data(calib)
    calib = calib or default_data(name, "calib")
    if lm and isinstance(calib, str):
        calib = text_data(calib)
    if calib is None:
        raise SlimkitError("give calibration data with --calib (for a CNN a .safetensors/.npy/.npz file or a shipped "
                           "dataset; for a transformer a text file, a folder of text or a shipped corpus)")
    eval_name = eval_data or default_data(name, "eval")
    if not lm and eval_name is not None:     # evaluation data that does not fit fails now, not after the run
        x, y = resolve(eval_name)
        check_data(fp_model, x, y)
    elif eval_name is not None:
        text_data(eval_name)
    t0 = time.perf_counter()
    qmodel = run_quantize(fp_model, calib, recipe=recipe, **options)
    seconds = time.perf_counter() - t0
    rows = {}
    if lm and eval_name is not None:
        rows = lm_rows(fp_model, qmodel, eval_name, qmodel.slimkit_info["device"], quiet, max_tokens)
    elif eval_name is not None:
        dev = qmodel.slimkit_info["device"]
        ref = predict(fp_model, x, device=dev, progress=not quiet, desc="evaluating FP")
        rows["FP"] = evaluate(fp_model, x, y, reference=ref, device=dev)
        rows["quantized"] = evaluate(qmodel, x, y, reference=ref, device=dev, progress=not quiet)
    else:
        from .eval import model_size_bytes

        rows = {"FP": {"size_bytes": model_size_bytes(fp_model)}, "quantized": {"size_bytes": model_size_bytes(qmodel)}}
    for r in rows.values():
        r.pop("seconds", None)        # a fake-quantized model's inference time is no speed figure: not reported
    rows["quantized"]["compress_seconds"] = seconds
    # a sparse float model is the reference here (its row and the quantized row's fidelity are to it), not the dense
    # original that `slimkit eval` of the result compares with: the manifest names it as the table does
    sparse_fp = bool((getattr(fp_model, "slimkit_info", None) or {}).get("sparsity"))
    metrics = {"fp_sparse" if sparse_fp else "fp": rows["FP"], "quantized": rows["quantized"], "eval_data": eval_name}
    save(qmodel, out, overwrite=overwrite, metrics=metrics)
    info = qmodel.slimkit_info
    cfg = info["config"]
    bits = f"W{cfg['w_bits']}" + (f"A{cfg['a_bits']}" if cfg["a_bits"] is not None else " (weights only)")
    if sparse_fp:
        rows = {"FP (sparse)": rows["FP"], "quantized": rows["quantized"]}
    print_table(rows, title=f"{info['method']} {bits} on {model}", console=Console())
    Console().print(f"saved to {out}")


@app.command(help="Sparsify MODEL: zero a share of its weights at an exact global sparsity (or N:M), evaluate, and "
                  "save it to --out in compact form (values + bitmask), with a per-layer sparsity chart.")
def sparsify(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the sparse model to"),
    method: Optional[str] = typer.Option(None, help="fcpts (the default: learned per-layer rates; needs calibration "
                                                    "data) | uniform | global_magnitude | erk | wanda | owl | sparsegpt "
                                                    "(LLM baselines; need data)"),
    sparsity: Optional[float] = typer.Option(None, help="share of the counted weights set to zero, in [0, 1) "
                                                        "(default 0.5)"),
    calib: Optional[str] = typer.Option(None, help="calibration inputs: for a CNN a .safetensors/.npy/.npz file or "
                                                   "shipped dataset name; for a transformer text (a file, a folder or "
                                                   "a shipped corpus) (default: the shipped model's calibration set)"),
    iters: Optional[int] = typer.Option(None, help="fcpts: rate-learning steps (400)"),
    finetune_iters: Optional[int] = typer.Option(None, "--finetune-iters", help="fcpts: steps with the masks fixed (100)"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="calibration samples for the methods that take data (default 1024 images; 128 text sequences for transformers)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="transformers: tokens per calibration "
                                          "sequence (default 2048, or the model's context if shorter; 128 for encoders)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="fcpts: batch size (64)"),
    lr: Optional[float] = typer.Option(None, help="fcpts: the weights' learning rate (SGD, 0.01)"),
    score: Optional[str] = typer.Option(None, help="fcpts: rank weights by 'magnitude' (|w|) or 'activation' "
                                                   "(|w| * input channel norm); default auto: activation for "
                                                   "transformers"),
    temperature: Optional[float] = typer.Option(None, help="fcpts: distillation temperature of the logits' KL (1; "
                                                           "the public code's run script uses 4)"),
    reconstruct: Optional[str] = typer.Option(None, help="fcpts: after learning the rates, 'distill' (fine-tune with "
                                                         "the masks fixed; default) or 'sparsegpt' (SparseGPT's "
                                                         "update at the learned rates; linear layers)"),
    nm: Optional[str] = typer.Option(None, help="N:M pattern instead, e.g. 2:4 (keep N of every M weights)"),
    exclude: Optional[list[str]] = typer.Option(None, help="layers to leave dense: names, parent modules or glob "
                                                           "patterns (e.g. '*depthwise*'); repeatable"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="data to evaluate FP and sparse models on"),
    weights: Optional[Path] = typer.Option(None, help="safetensors state dict for a factory-built model"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda for evaluation (default: cuda when available)"),
    max_tokens: int = typer.Option(20000, "--max-tokens", min=1,
                                   help="transformers: evaluation tokens for perplexity"),
    overwrite: bool = typer.Option(False, help="replace --out if it exists"),
    quiet: bool = typer.Option(False, help="no progress bars"),
):
    from .core.data import resolve
    from .core.sparsity import check_target
    from .eval import check_data, evaluate, model_size_bytes, predict
    from .io.artifact import check_output, save
    from .models.registry import default_data
    from .quantize import pick_device
    from .report import print_table
    from .sparsify import METHODS, NEEDS_DATA, parse_nm, plot_rates, sparsity_table
    from .sparsify import sparsify as run_sparsify
    from .transformer import is_transformer

    check_output(out, overwrite)      # before any work: a bad --out fails at once
    if nm is None:
        method = method or "fcpts"
        sparsity = 0.5 if sparsity is None else sparsity
        check_target(sparsity)
        if method not in METHODS:
            raise SlimkitError(f"unknown sparsity method {method!r}: choose one of {', '.join(METHODS)}")
    else:
        pattern = parse_nm(nm)
        given = [flag for flag, v in (("--method", method), ("--sparsity", sparsity)) if v is not None]
        if given:
            raise SlimkitError(f"--nm {nm} keeps {pattern[0]} of every {pattern[1]} weights by magnitude, which sets "
                               f"the method and the sparsity ({1 - pattern[0] / pattern[1]:.0%}): drop "
                               f"{' and '.join(given)}")
        method = "fcpts"                # (not used: N:M takes its own path)
    fp_model, is_artifact = load_any(model, weights)
    if is_artifact:
        raise SlimkitError(f"{model} is a saved artifact: give the float model")
    options = {k: v for k, v in dict(iters=iters, finetune_iters=finetune_iters, batch_size=batch_size, lr=lr,
                                     score=score, temperature=temperature,
                                     reconstruct=reconstruct).items() if v is not None}
    learn = nm is None and method in NEEDS_DATA
    if calib is not None and not learn:
        raise SlimkitError(f"--calib is not used by {'N:M magnitude pruning' if nm else method} (no data needed): "
                           "drop it, or choose a method that learns from data (" + ", ".join(NEEDS_DATA) + ")")
    if learn:
        calib = calib or default_data(model, "calib")
        if calib is None:
            raise SlimkitError(f"{method} needs calibration inputs: give --calib (a .safetensors/.npy/.npz file, a "
                               "text file or folder, or a shipped dataset), or choose --method uniform | "
                               "global_magnitude | erk")
        if is_transformer(fp_model) and isinstance(calib, str):
            calib = text_data(calib)
    if seq_len is not None and not (learn and is_transformer(fp_model)):
        raise SlimkitError("--seq-len sets the length of a transformer's calibration sequences; "
                           f"{'this model is not a transformer' if learn else method + ' takes no data'}: drop it")
    if options and (nm is not None or method != "fcpts"):
        raise SlimkitError("--iters, --finetune-iters, --batch-size, --lr, --score, --temperature and --reconstruct "
                           "apply to --method fcpts only")
    eval_name = eval_data or default_data(model, "eval")
    if not is_transformer(fp_model) and eval_name is not None:   # fails now if it does not fit, not after the run
        x, y = resolve(eval_name)
        check_data(fp_model, x, y)
    elif eval_name is not None:
        text_data(eval_name)        # evaluation text that does not exist fails now, not after the run
    t0 = time.perf_counter()
    smodel = run_sparsify(fp_model, calib if learn else None, method=method, sparsity=sparsity, nm=nm,
                          exclude=tuple(exclude or ()), device=device, num_samples=num_samples, seq_len=seq_len,
                          progress=not quiet, **options)
    seconds = time.perf_counter() - t0
    dev = str(pick_device(device))
    if is_transformer(fp_model) and eval_name is not None:
        rows = lm_rows(fp_model, smodel, eval_name, dev, quiet, max_tokens)
        rows = {"FP": rows["FP"], "sparse": rows["quantized"]}
    elif eval_name is not None:
        ref = predict(fp_model, x, device=dev, progress=not quiet, desc="evaluating FP")
        rows = {"FP": evaluate(fp_model, x, y, reference=ref, device=dev),
                "sparse": evaluate(smodel, x, y, reference=ref, device=dev, progress=not quiet)}
    else:
        rows = {"FP": {}, "sparse": {}}
    for r in rows.values():
        r.pop("seconds", None)        # masked weights run as dense ones: their inference time is no speed figure
    rows["sparse"]["compress_seconds"] = seconds
    save(smodel, out, overwrite=overwrite, metrics={"fp": rows["FP"], "sparse": rows["sparse"], "eval_data": eval_name})
    rows["FP"]["size_bytes"] = model_size_bytes(fp_model)
    rows["sparse"]["size_bytes"] = model_size_bytes(smodel)    # as FP's and as eval counts it, not the files
    plot_rates(smodel.slimkit_info, out / "sparsity.png")
    con = Console()
    con.print(sparsity_table(smodel.slimkit_info))
    print_table(rows, title=f"{smodel.slimkit_info['sparsity']['method']} on {model}", console=con)
    con.print(f"saved to {out} (per-layer chart: {out / 'sparsity.png'})")


@app.command(name="eval", help="Evaluate a model or a saved quantized model: top-1 accuracy (with labels) and "
                               "fidelity to the full-precision model (top-1 agreement, KL).")
def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Optional[str] = typer.Option(None, help="evaluation data (default: the shipped model's evaluation set)"),
    reference: Optional[str] = typer.Option(None, help="the full-precision model to compare with (default: the one a "
                                                       "saved artifact was made from, when slimkit can build it)"),
    weights: Optional[Path] = typer.Option(None, help="safetensors state dict for a factory-built model (with a saved "
                                                      "artifact as MODEL: for the float reference it is compared with)"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    max_tokens: int = typer.Option(20000, "--max-tokens", min=1,
                                   help="transformers: evaluation tokens for perplexity"),
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
    data = data or default_data(shipped_name(model, m, is_artifact), "eval")
    if data is None:
        raise SlimkitError("give evaluation data with --data (a .safetensors/.npy/.npz file or a shipped dataset)")
    x, y = resolve(data)
    ref_model = None
    ref_weights = weights if is_artifact else None     # an artifact holds its own weights: --weights is its reference's
    if reference is not None:
        ref_model, _ = load_any(reference, ref_weights)
        if is_transformer(ref_model):
            raise SlimkitError(f"--reference {reference} is a transformer, but {model} is a CNN: give the float "
                               "model it was made from")
    elif is_artifact and spec and "hf" in spec:      # a Hugging Face image model: its float twin from the folder
        from .models.hf import load_hf, source_available

        if source_available(spec["hf"]):
            ref_model = load_hf(spec["hf"])[0]
        else:
            console.print(f"[yellow]the float model's folder {spec['hf']} (recorded when the artifact was made) is "
                          "gone: agreement with FP is not reported; pass it with --reference[/]")
    elif is_artifact and spec:
        kwargs = {**spec.get("kwargs", {}), **({"weights": ref_weights} if ref_weights is not None else {})}
        gone = kwargs.get("weights")
        if ref_weights is not None and not Path(ref_weights).exists():
            raise SlimkitError(f"--weights {ref_weights} does not exist")
        if gone is not None and not Path(gone).exists():
            console.print(f"[yellow]the float reference's weights {gone} (recorded when the artifact was made) are "
                          "gone: agreement with FP is not reported; pass them with --weights, or --reference[/]")
        else:
            ref_model = get_model(spec["builder"], **kwargs)
    if is_artifact:
        ref_model = _checked_reference(m, ref_model, reference is not None)
    metrics = evaluate(m, x, y, reference=ref_model, device=dev, progress=not quiet)
    if is_artifact:     # fake-quantized or masked weights run as dense float ones: no speed figure (as quantize says)
        metrics.pop("seconds", None)
    if y is None and ref_model is None:
        console.print("[yellow]no labels and no reference model: only size is reported[/]")
    print_table({Path(model).name or model: metrics}, title=f"eval on {data}", console=Console())


def _checked_reference(m, ref, explicit: bool):
    """The float reference to compare artifact `m` with: `ref` when its weights are those `m` was made from (the
    fingerprint recorded with it; artifacts from before it are not checked). A rebuilt one that differs (a factory
    building new random weights on each call, a source folder saved over since) gives None, with a note; one the
    user named with --reference is kept, with a note."""
    from .core.fingerprint import weights_digest

    expected = (getattr(m, "slimkit_info", None) or {}).get("reference_digest")
    if ref is None or not expected or weights_digest(ref) == expected:
        return ref
    if explicit:
        console.print("[yellow]--reference is not the float model this artifact was made from (its weights differ): "
                      "fidelity is measured against it as given[/]")
        return ref
    console.print("[yellow]the float model rebuilt from what this artifact recorded is not the one it was made from "
                  "(its weights differ: a factory that builds new random weights on each call, or a source saved "
                  "over since): fidelity to FP is not reported; pass the original with --reference (or --weights)[/]")
    return None


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
    if lm_kind(m) != "encoder" and reference is not None:
        raise SlimkitError(f"{model} is a causal LM, scored by perplexity, which needs no reference: drop --reference "
                           "(evaluate the float model on its own for its perplexity)")
    if lm_kind(m) == "encoder":
        if reference is None and source is None:
            raise SlimkitError("embedding cosine needs the float model: pass --reference MODEL")
        from .models.hf import source_available

        if reference is None and not source_available(source):
            raise SlimkitError(f"the float model's folder {source} (recorded when {model} was made) is gone: "
                               "embedding cosine needs it, pass it with --reference")
        ref = load_any(reference)[0] if reference is not None else load_hf(source)[0]
        from .transformer import is_transformer

        if not is_transformer(ref) or lm_kind(ref) != "encoder":
            raise SlimkitError(f"--reference {reference} is not a transformer encoder like {model}: give the float "
                               "model it was made from")
        ref = _checked_reference(m, ref, reference is not None)
        if ref is None:
            raise SlimkitError(f"the float model in {source} is not the one {model} was made from (its weights "
                               "differ: the folder was saved over since): embedding cosine needs the original, "
                               "pass it with --reference")
    metrics = evaluate_lm(m, text_data(data), tok, reference=ref, max_tokens=max_tokens, device=dev, progress=not quiet)
    print_table({Path(model).name or model: metrics}, title=f"eval on {data}", console=Console())


@app.command(name="train-lm", help="Train a small GPT on a folder of text (dense, or with structured FFNs, optionally "
                                   "self-guided), with checkpoints, exact --resume and held-out perplexity. Runs "
                                   "unchanged under torchrun (DDP; --fsdp to shard). Unset options take "
                                   "slimkit.structured.train.TrainConfig's defaults.")
def train_lm(
    out: Path = typer.Option(..., "--out", "-o", help="run folder: checkpoints and report.json"),
    corpus: Optional[Path] = typer.Option(None, help="folder of text files (.txt/.rst/.md/.py, or those .gz), recursive"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where the token files go (default: slimkit's cache)"),
    tokenizer: Optional[str] = typer.Option(None, help="bpe (trained on the corpus; default) | smollm2 (with --corpus)"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocabulary (8192; with --corpus)"),
    val_percent: Optional[float] = typer.Option(None, "--val-percent", help="share of the corpus files held out for "
                                                "evaluation, by a stable hash of their paths (10; a single file: its "
                                                "last tokens)"),
    ffn: Optional[str] = typer.Option(None, help="dense (default) | lowrank | blockshuffle | blockdense"),
    param_ratio: Optional[float] = typer.Option(None, "--param-ratio", help="structured FFN parameters / dense (0.32)"),
    nblocks: Optional[int] = typer.Option(None, help="blocks of the block-diagonal kinds (default: from the ratio)"),
    self_guided: Optional[bool] = typer.Option(None, "--self-guided/--no-self-guided",
                                               help="a decaying dense guide during the first part of training"),
    guide_fraction: Optional[float] = typer.Option(None, "--guide-fraction",
                                                   help="self-guided: share of the steps the guide fades over (0.5)"),
    act: Optional[str] = typer.Option(None, help="FFN activation: gelu (default) | gelu_tanh | swiglu"),
    pos: Optional[str] = typer.Option(None, help="positions: rope (default) | learned"),
    norm: Optional[str] = typer.Option(None, help="layernorm (default) | rmsnorm"),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="width (384)"),
    n_layer: Optional[int] = typer.Option(None, "--n-layer", help="blocks (6)"),
    n_head: Optional[int] = typer.Option(None, "--n-head", help="attention heads (6)"),
    d_ff: Optional[int] = typer.Option(None, "--d-ff", help="FFN hidden size (4*d_model; 8/3*d_model for swiglu)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per sequence (256)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="sequences per micro-batch per GPU (16)"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="micro-batches per update (1)"),
    steps: Optional[int] = typer.Option(None, help="updates (1000)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (1e-3)"),
    warmup: Optional[int] = typer.Option(None, help="linear warm-up updates (100)"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (0.1)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="updates between evaluations (200; 0: at the end)"),
    eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", help="held-out tokens per evaluation (131072)"),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="updates between checkpoints (500; 0: at the end)"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="continue from the latest checkpoint in --out"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="under torchrun: shard with FSDP2 instead of DDP"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    ffn_kernel: Optional[str] = typer.Option(None, "--ffn-kernel", help="eager (default) | cublaslt: GELU and GELU' "
                                             "in cuBLASLt matmul epilogues (CUDA + nvmath-python, --act gelu_tanh)"),
    seed: Optional[int] = typer.Option(None, help="random seed (0): weights and data order"),
    quiet: bool = typer.Option(False, help="no progress bar"),
):
    from .structured.train import TrainConfig, train

    options = {k: v for k, v in locals().items() if k not in ("quiet", "TrainConfig", "train") and v is not None}
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    cfg = TrainConfig(**options, progress=not quiet)
    for name, needs in cfg.unread().items():
        if name in options:
            raise SlimkitError(f"--{name.replace('_', '-')} has no effect without {needs}: drop it, or add that")
    report = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:      # under torchrun: one summary, from rank 0
        return
    Console().print(f"val ppl {report['val_ppl']:.2f}, train ppl {report['train_ppl']:.2f}, {report['tokens']:,} tokens, "
                    f"{report['train_flops']:.3g} training FLOPs, {report['wall_s']:.3g} s of training steps (evaluations and "
                    f"checkpoints not counted); report in {out}/report.json")


@app.command(name="generate-lm", help="Continue a prompt with a GPT trained by train-lm (the latest checkpoint of "
                                      "RUN), decoding with a KV cache; prints each sample.")
def generate_lm(
    run: Path = typer.Argument(..., help="train-lm's run folder (--out), or one of its checkpoint folders"),
    prompt: str = typer.Option("", help="text to continue (empty: the start of a document)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="tokens to add (default: up to the "
                                                 "model's seq_len)"),
    temperature: float = typer.Option(0.8, help="sampling temperature (0: the most likely token each step)"),
    top_k: Optional[int] = typer.Option(50, "--top-k", help="sample among the k most likely tokens (0: all)"),
    num_samples: int = typer.Option(1, "--num-samples", help="continuations, decoded together as one batch"),
    seed: int = typer.Option(0, help="random seed of the sampling"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when available)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="the folder holding the run's tokenizer.json "
                                            "(default: where the run's corpus was tokenised)"),
    premerge_ffn: bool = typer.Option(False, "--premerge/--no-premerge", help="merge each structured FFN where "
                                      "that measures faster at this batch (slimkit.structured.premerge)"),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="replay each decoding step "
                                              "as one CUDA graph (default: on a GPU)"),
):
    import torch

    from .quantize import pick_device
    from .structured.data import EOT
    from .structured.premerge import premerge
    from .structured.train import load_model, run_tokenizer

    if num_samples < 1:
        raise SlimkitError(f"--num-samples must be >= 1, got {num_samples}")
    if not 0 <= seed < 2 ** 63:
        raise SlimkitError(f"--seed must be in [0, 2**63), got {seed}")
    dev = str(pick_device(device))
    tok = run_tokenizer(run, data_dir)
    model = load_model(run, device=dev)
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else [tok.token_to_id(EOT)]
    if not ids or ids[0] is None:
        raise SlimkitError("the prompt encodes to no tokens: give some text")
    room = model.cfg.seq_len - len(ids)
    if room < 0:
        raise SlimkitError(f"the prompt is {len(ids)} tokens, more than the model's {model.cfg.seq_len} positions: "
                           "shorten it")
    new = room if max_new_tokens is None else max_new_tokens
    if new < 0:
        raise SlimkitError(f"--max-new-tokens must be >= 0, got {new}")
    if new > room:
        raise SlimkitError(f"the prompt takes {len(ids)} of the model's {model.cfg.seq_len} positions: "
                           f"--max-new-tokens can be at most {room}")
    graph = dev.startswith("cuda") if cuda_graph is None else cuda_graph
    if premerge_ffn:     # timed the way generate will run the steps
        model = premerge(model, tokens=num_samples, graph=graph)
    gen = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, device=dev)
    out = model.generate(idx, new, temperature=temperature, top_k=top_k or None, generator=gen,
                         vocab_size=min(tok.get_vocab_size(), model.cfg.vocab_size),    # not the padding's ids
                         cuda_graph=graph)
    for i, row in enumerate(out.tolist()):      # the text on stdout, the separators too (one stream to read)
        if num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode(row if prompt else row[1:], skip_special_tokens=False))


@app.command(help="Tokenise a folder of text files into memory-mapped train/val token files (what train-lm reads).")
def tokenize(
    corpus: Path = typer.Argument(..., help="folder of text files (.txt/.rst/.md/.py, or those .gz), recursive"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for train.bin/val.bin, their .json sidecars, tokenizer.json"),
    tokenizer: str = typer.Option("bpe", help="bpe (trained on the corpus) | smollm2"),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="BPE vocabulary"),
    val_percent: float = typer.Option(10.0, "--val-percent", help="share of the files held out (by stable hash)"),
):
    from .structured.data import prepare_corpus

    c = prepare_corpus(corpus, out, tokenizer, vocab_size, val_percent)
    Console().print(f"{c.train.size:,} train and {c.val.size:,} val tokens, vocab {c.vocab_size}, in {out}")


def main() -> None:
    """Entry point: bad input prints one line and exits with code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)    # typer turns Ctrl-C into a returned 130, an explicit Exit into its code
        if isinstance(code, int) and code:
            if code == 130:
                console.print("interrupted", markup=False)
            sys.exit(code)
    except (SlimkitError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as e:  # click's usage errors: typer >= 0.22 raises those of its own bundled copy of click
        if isinstance(e, _click_errors("ClickException")):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, _click_errors("Abort")):
            sys.exit(1)
        raise


def _click_errors(name: str) -> tuple[type, ...]:
    """click's exception class `name`, from typer's bundled click and from the click package where installed."""
    found = [c for c in typer.BadParameter.__mro__ + typer.Abort.__mro__ if c.__name__ == name]
    try:
        import click
        found.append(getattr(click.exceptions, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


if __name__ == "__main__":
    main()
