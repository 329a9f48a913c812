"""The Markdown table of ``lotscan bench --table`` (from its JSON report)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("method", "precision", "batch", "FLOPs/img", "ms/img", "img/s", "GFLOP/s",
           "% fp32 peak", "% bf16 peak", "x reference")


def flops_text(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f}"


def _share(row: dict[str, Any], precision: str) -> str:
    value = row.get(f"share_of_{precision}_peak")
    return "" if value is None else f"{100 * value:.1f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per (precision, batch size), then the reference loop's."""
    flops = flops_text(report["flops_per_image"])
    out = []
    for row in report["results"]:
        precision = row["precision"] + (" cl" if row.get("channels_last") else "")
        speedup = row.get("speedup_vs_reference")
        out.append([report["method"], precision, str(row["batch_size"]), flops,
                    f"{row['ms_per_image']:.2f}", f"{row['images_per_s']:.2f}",
                    f"{row['gflops_per_s']:.2f}", _share(row, "fp32"), _share(row, "bf16"),
                    "" if speedup is None else f"{speedup:.2f}"])
    ref = report.get("reference")
    if ref:
        out.append([report["method"], "fp32 reference loop", "1", flops, f"{ref['ms_per_image']:.2f}",
                    f"{ref['images_per_s']:.2f}", f"{ref['gflops_per_s']:.2f}", _share(ref, "fp32"),
                    _share(ref, "bf16"), "1.00"])
    return out


def markdown_table(report: dict[str, Any], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    notes = []
    peaks = report.get("peak_gflops", {}).get("matmul")
    if peaks:
        notes.append("matmul peak " + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in peaks.items()))
    if "bf16_vs_fp32_max_abs_image_score_diff" in report:
        notes.append(f"bf16 - fp32 max |image score| {report['bf16_vs_fp32_max_abs_image_score_diff']:.2g}")
    if report.get("reference"):
        notes.append(f"reference - batched max |image score| "
                     f"{report['reference']['max_abs_image_score_diff']:.2g}")
    notes.append(f"{report['device_name']}, {report['torch_threads']} torch thread(s)")
    return "\n".join(lines) + "\n\n" + f"{report['method']}: " + "; ".join(notes) + "\n"
