"""What every benchmark shares: the results file in DESIGN.md's one shape, and its markdown twin."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    """The commit the measured code came from (SLIMKIT_GIT when the tree travelled without its .git)."""
    if os.environ.get("SLIMKIT_GIT"):
        return os.environ["SLIMKIT_GIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge_rows(name: str, rows: list[dict], key: tuple[str, ...] = ("model", "method", "setting", "metric")) -> list[dict]:
    """An earlier run's rows of bench/results/<name>.json, each replaced in place by its redone twin in `rows`,
    then the rows it did not have (for runs in parts)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows
    fresh = {tuple(r.get(k) for k in key): r for r in rows}
    merged = [fresh.pop(tuple(r.get(k) for k in key), r) for r in json.loads(path.read_text())["rows"]]
    return merged + list(fresh.values())  # a redone row keeps its place; new rows go at the end


def write_results(name: str, device: str, rows: list[dict], notes: list[str] | None = None,
                  columns: tuple[str, ...] = ("model", "method", "setting", "metric", "value", "seconds"),
                  append: bool = False) -> Path:
    """bench/results/<name>.json ({bench, date, device, git, rows}) and <name>.md (a table + notes).
    append=True (a run in parts): the earlier rows this run does not redo stay (merge_rows), and so do the
    earlier notes, which may have been written after reading those rows (set_notes)."""
    path = RESULTS / f"{name}.json"
    commit, where = git_commit(), device_name(device)
    rows = [{**r, "git": commit, "device": where} for r in rows]   # each row says where it was measured
    if append and path.exists():
        rows = merge_rows(name, rows)
        notes = json.loads(path.read_text()).get("notes") or notes
    doc = {"bench": name, "date": datetime.date.today().isoformat(), "device": where, "git": commit, "rows": rows}
    if notes:
        doc["notes"] = notes
    return _write(doc, columns)


def set_notes(name: str, notes: list[str],
              columns: tuple[str, ...] = ("model", "method", "setting", "metric", "value", "seconds")) -> Path:
    """Replace the notes of bench/results/<name>.json (and its .md), keeping its rows, date, device and commit:
    for what a run's figures mean, written after reading them."""
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    doc["notes"] = notes
    return _write(doc, columns)


def provenance(doc: dict) -> str:
    """The markdown header line: date, device and commit, or, for a file written in parts, each device and
    commit with its row count (rows written before rows carried their own say so)."""
    if not any("git" in r for r in doc["rows"]):
        return f"{doc['date']} on {doc['device']}, commit {doc['git']}"

    def counted(field: str) -> str:
        counts: dict[str, int] = {}
        for r in doc["rows"]:
            key = r.get(field, "an earlier run (see the notes)")
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k} ({n} rows)" for k, n in counts.items()) if len(counts) > 1 else next(iter(counts))
    return f"{doc['date']}; device {counted('device')}; commit {counted('git')}"


def _write(doc: dict, columns: tuple[str, ...]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = doc["bench"]
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    lines = [f"# {name}", "", provenance(doc), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in doc["rows"]:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if doc.get("notes"):
        lines += [""] + [f"- {n}" for n in doc["notes"]]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path


# The CNN benchmarks' models: what each is measured on (top-1 with labels, or agreement with fp32) and its
# calibration set.
CNN_MODELS = {
    "fmnist-resnet": {"calib": "fmnist-calib", "eval": "fmnist-test", "metric": "top1"},
    "efficientnet-lite0": {"calib": "natural-calib", "eval": "natural-eval", "metric": "agreement"},
}


def cnn_setup(model_name: str, device: str):
    """(model, calib inputs, eval inputs, eval labels or None, fp32 predictions, FP metrics, metric name)."""
    from slimkit.eval import evaluate, predict
    from slimkit.models import get_dataset, get_model

    spec = CNN_MODELS[model_name]
    model = get_model(model_name)
    calib = get_dataset(spec["calib"])
    calib_x = calib[0] if isinstance(calib, tuple) else calib
    ev = get_dataset(spec["eval"])
    eval_x, eval_y = ev if isinstance(ev, tuple) else (ev, None)
    ref = predict(model, eval_x, device=device)
    fp = evaluate(model, eval_x, eval_y, reference=ref, device=device)
    return model, calib_x, eval_x, eval_y, ref, fp, spec["metric"]


def lm_setup(model_name: str, device: str, num_samples: int, seq_len: int, eval_tokens: int, window: int = 512,
             stride: int = 256, n_sentences: int = 256):
    """(model, tokenizer, calibration token blocks, measure(model) -> value, metric name, causal) for a shipped
    transformer, on the Python documentation: a causal LM's perplexity on the held-out split (sliding window),
    an encoder's mean-pooled embedding cosine to the fp32 model on held-out sentences. Calibration comes from the
    other split: num_samples blocks of seq_len tokens (causal) or 4*num_samples 128-token windows (encoders)."""
    from slimkit.lm_eval import embed, embedding_cosine, perplexity
    from slimkit.models.hf import load_hf
    from slimkit.text import corpus_tokens, encode_batch, get_corpus, sentences, token_blocks
    from slimkit.transformer import encoder_blocks

    calib_texts, eval_texts = get_corpus("python-docs", "calib"), get_corpus("python-docs", "eval")
    model, tok = load_hf(model_name)
    causal = model_name != "minilm-l6"
    if causal:
        tokens = corpus_tokens(eval_texts, tok)
        calib = token_blocks(calib_texts, tok, num_samples, seq_len, seed=0)
        return (model, tok, calib, lambda m: perplexity(m, tokens, window, stride, eval_tokens, device=device,
                                                        progress=False), "ppl", True)
    batch = encode_batch(tok, sentences(eval_texts, n_sentences, seed=1), max_len=128)
    ref = embed(model, batch)
    calib = encoder_blocks(calib_texts, tok, num_samples * 4, 128, seed=0)
    return model, tok, calib, lambda m: embedding_cosine(m, ref, batch), "cosine", False
