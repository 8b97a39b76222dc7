"""Reports: the table printed at the end of a run (what compression cost, what it gained)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def fmt_size(n: float) -> str:
    """Bytes in SI units (1 KB = 1000 B), as file managers and `ls -lh --si` show them."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def fmt_metric(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("top1", "agreement"):
        return f"{100 * value:.2f}%"
    if key == "size_bytes":
        return fmt_size(value)
    if key in ("seconds", "compress_seconds"):
        return f"{value:.1f} s"
    if key == "cosine" and isinstance(value, float) and value != 1.0:
        return f"{value:.6f}"         # 0.9999984 must not print as FP's 1
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


LABELS = {"top1": "top-1 accuracy", "agreement": "top-1 agreement with FP", "kl": "KL(FP || model)",
          "ppl": "perplexity", "cosine": "embedding cosine to FP", "size_bytes": "size", "seconds": "inference time",
          "compress_seconds": "compression time"}


def results_table(rows: dict[str, dict], title: str = "slimkit") -> Table:
    """One column per model (e.g. FP, quantized), one row per metric present in any of them."""
    keys = [k for k in LABELS if any(k in r for r in rows.values())]
    table = Table(title=title)
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    for k in keys:
        table.add_row(LABELS[k], *[fmt_metric(k, r.get(k)) for r in rows.values()])
    return table


def print_table(rows: dict[str, dict], title: str = "slimkit", console: Console | None = None) -> None:
    (console or Console()).print(results_table(rows, title))
