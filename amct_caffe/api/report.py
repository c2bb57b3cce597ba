"""The accuracy report's files: report.json, the plots (PNG) and report.html (one self-contained page).

The page reads top-down: the summary (outputs' cosine / SQNR, top-1 agreement), the layers that add
the most error, the per-layer error along the network, then for the worst quantized layers the
histogram of their FP32 input with the clip range the record chose, and of their weights with the
quantization grid. Plots are made with matplotlib's headless Agg backend and embedded in the page as
PNG data, so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io as _bytes_io
import json
import math
import re

import numpy as np

from amct_caffe.api.compare import (BlobComparison, BlobReport, batch_samples, by_error_added, json_safe,
                                    quantized_layers, report_dict)
from amct_caffe.errors import AmctError
from amct_caffe.io.outputs import StagedOutputs
from amct_caffe.io.paths import check_output

WORST_PLOTTED = 4


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    _figure().close(fig)
    return buf.getvalue()


def layer_error_plot(reports: list[BlobReport]) -> bytes:
    """1 - cosine (log scale) and SQNR of every compared blob, in network order."""
    plt = _figure()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    x = np.arange(len(reports))
    err = np.array([max(1 - r.cosine, 1e-12) for r in reports])
    sqnr = np.array([r.sqnr_db if math.isfinite(r.sqnr_db) else np.nan for r in reports])
    top.semilogy(x, err, ".-", lw=0.8)
    top.set_ylabel("1 - cosine")
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(x, sqnr, ".-", lw=0.8, color="tab:orange")
    bottom.set_ylabel("SQNR (dB)")
    bottom.grid(True, alpha=0.3)
    outputs = [i for i, r in enumerate(reports) if r.output]
    for i in outputs:
        top.axvline(i, color="tab:red", alpha=0.3)
    step = max(1, len(reports) // 40)
    bottom.set_xticks(x[::step])
    bottom.set_xticklabels([reports[i].name for i in x[::step]], rotation=90, fontsize=7)
    top.set_title("FP32 vs quantized, per blob along the network (red: outputs)")
    return _png(fig)


def _histogram(ax, values: np.ndarray, bins: int, span, color: str) -> None:
    """Counts of the finite ``values`` in ``bins`` equal bins over ``span`` (None: their range) on a log axis,
    drawn as one step outline (a bar per bin, as ``ax.hist`` draws, made its plot three times slower); NaN
    and infinities (a Log of negative inputs...) are counted in the legend, not binned."""
    finite = values[np.isfinite(values)]
    if finite.size:
        counts, edges = np.histogram(finite, bins=bins, range=span)
        ax.stairs(counts, edges, fill=True, color=color, alpha=0.8)
        ax.set_yscale("log")
    if finite.size < values.size:
        ax.text(0.02, 0.95, f"{values.size - finite.size} of {values.size} values NaN or infinite",
                transform=ax.transAxes, fontsize=8, va="top", color="tab:red")


def activation_plot(values: np.ndarray, clip: tuple[float, float], title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3))
    v = np.asarray(values, np.float64).ravel()  # (float32 bin arithmetic overflows on spans near its range)
    lo, hi = clip
    finite = v[np.isfinite(v)]
    span = (min(float(finite.min(initial=lo)), lo), max(float(finite.max(initial=hi)), hi))
    _histogram(ax, v, 120, span, "tab:blue")
    for edge in clip:
        ax.axvline(edge, color="tab:red", lw=1.2)
    clipped = np.count_nonzero((v < lo) | (v > hi)) / v.size if v.size else 0.0
    ax.set_title(f"{title}\nclip range [{lo:.4g}, {hi:.4g}], {100 * clipped:.3f}% clipped", fontsize=9)
    ax.set_xlabel("FP32 activation")
    return _png(fig)


def weight_plot(weights: np.ndarray, scale_w: np.ndarray, title: str) -> bytes:
    """Histogram of the weights and, for the channel with the widest step, its INT8 grid."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3))
    w = np.asarray(weights, np.float64)
    _histogram(ax, w.ravel(), 160, None, "tab:green")
    step = float(np.max(scale_w))
    lo, hi = -128 * step, 127 * step
    ax.axvline(lo, color="tab:red", lw=1.2)
    ax.axvline(hi, color="tab:red", lw=1.2)
    finite = w[np.isfinite(w)]
    if finite.size and 255 * step / max(np.ptp(finite), 1e-30) < 60:  # grid lines only where they can be told apart
        for k in range(-128, 128, 8):
            ax.axvline(k * step, color="tab:red", lw=0.3, alpha=0.4)
    per = "per channel" if np.size(scale_w) > 1 else "per tensor"
    ax.set_title(f"{title}\nINT8 grid ({per}, widest step {step:.3g}): range [{lo:.3g}, {hi:.3g}]", fontsize=9)
    ax.set_xlabel("weight")
    return _png(fig)


def _fmt(v, digits: int = 6) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(rows: list[BlobReport], columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(getter(r))}</td>" for _, getter in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_COLUMNS = [("blob", lambda r: r.name), ("layer (FP32)", lambda r: r.layer), ("type", lambda r: r.type),
            ("quantized layer", lambda r: r.quant_layer), ("cosine", lambda r: r.cosine),
            ("error added", lambda r: r.error_added), ("SQNR dB", lambda r: r.sqnr_db),
            ("max |error|", lambda r: r.max_abs_error), ("relative error", lambda r: r.relative_error)]
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
          "td:first-child,td:nth-child(2),td:nth-child(3),td:nth-child(4){text-align:left}"
          "img{max-width:100%}.plots img{width:48%;margin:0.5%}")


def _img(name: str, data: bytes) -> str:
    return (f'<img alt="{html.escape(name)}" id="{html.escape(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


def blob_dump(net, feed, time_major: frozenset = frozenset()) -> bytes:
    """Every blob of ``net`` for the first sample of ``feed``, as the bytes of an .npz (blob names as keys; a
    time-major value, a recurrent layer's, keeps its time axis first: ``(T, 1, ...)``)."""
    net.forward(**feed)
    n = batch_samples(feed, time_major)
    # a DetectionOutput's list (1, 1, K, 7) holds every sample's boxes, column 0 the sample: the first one's rows
    lists = {t for layer, tops in zip(net.layers, net.top_names.values(), strict=True)
             if layer.type == "DetectionOutput" for t in tops}
    arrays = {}
    for name, b in net.blobs.items():
        if name in lists and b.data.ndim == 4 and b.data.shape[-1] == 7:
            arrays[name] = np.array(b.data[:, :, b.data[0, 0, :, 0] == 0])
        elif name in time_major and b.data.ndim > 1 and b.data.shape[1] == n:
            arrays[name] = np.array(b.data[:, :1])
        else:
            arrays[name] = np.array(b.data[:1] if b.data.ndim and b.data.shape[0] == n else b.data)
    buf = _bytes_io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_report(output_dir, reports: list[BlobReport], summary: dict, comparison: BlobComparison,
                 first_batch, titles: dict[str, str], dump: bool = False) -> dict[str, str]:
    """Write report.json, report.html and the PNG plots into ``output_dir`` (all or nothing); with
    ``dump``, also every blob of both models for the first sample of ``first_batch`` (fp32_blobs.npz,
    quant_blobs.npz). The activation histograms show the last batch compared, which the FP32 net still
    holds (no forward is run again for them)."""
    from pathlib import Path

    out = Path(output_dir)
    staged = StagedOutputs()
    plots: dict[str, bytes] = {"layer_error.png": layer_error_plot(reports)}
    qlayers = quantized_layers(comparison.quant_graph)
    by_layer = {r.quant_layer: r for r in by_error_added(reports) if r.quant_layer in qlayers}
    worst = list(by_layer.values())[:WORST_PLOTTED]
    sections = []
    for i, r in enumerate(worst, 1):
        info, node = qlayers[r.quant_layer], comparison.quant_graph.node(r.quant_layer)
        figures = []
        for index, clip in sorted(info["inputs"].items()):
            blob = node.bottoms[index]
            fp32_blob = _fp32_name(comparison, blob)
            if fp32_blob is not None:
                name = f"activation_{i}_{index}.png"
                plots[name] = activation_plot(comparison.fp32_net.blobs[fp32_blob].data, clip,
                                              f"input {index} of '{r.quant_layer}' ({fp32_blob})")
                figures.append(name)
        if info["scale_w"] is not None and node.params:
            name = f"weights_{i}.png"
            plots[name] = weight_plot(node.params[0], info["scale_w"], f"weights of '{r.quant_layer}' (as quantized)")
            figures.append(name)
        sections.append((r, figures))
    for name, data in plots.items():
        staged.add_bytes(out / name, data)
    dumps = {}
    if dump and first_batch is not None:
        dumps = {"fp32_blobs": blob_dump(comparison.fp32_net, first_batch, comparison.time_major),
                 "quant_blobs": blob_dump(comparison.quant_net, first_batch, comparison.time_major)}
        for name, data in dumps.items():
            staged.add_bytes(out / f"{name}.npz", data)
    paths = {"json": staged.add_json(out / "report.json", report_dict(reports, summary))}
    page = _page(reports, summary, sections, plots, titles)
    paths["html"] = staged.add_text(out / "report.html", page)
    staged.commit()
    paths.update({name: str(out / name) for name in plots})
    paths.update({name: str(out / f"{name}.npz") for name in dumps})
    _remove_earlier_reports_files(out, set(paths.values()))
    return paths


# The files of a report whose number varies from one report to another (plots of the worst layers, --dump)
_VARYING = re.compile(r"(activation_\d+_\d+|weights_\d+)\.png|(fp32|quant)_blobs\.npz")


def _remove_earlier_reports_files(out, written: set[str]) -> None:
    """A report folder holds one report: the plots and dumps an earlier report wrote there and this one did not
    (fewer layers plotted, no --dump) would be taken for this one's. Inputs are never removed."""
    for path in out.iterdir():
        if _VARYING.fullmatch(path.name) and str(path) not in written and path.is_file():
            try:
                check_output(path)
            except AmctError:
                continue
            with contextlib.suppress(OSError):
                path.unlink()


def _fp32_name(comparison: BlobComparison, quant_blob: str) -> str | None:
    """The FP32 blob holding what a quantized layer's input Quant reads (its own input, by name)."""
    node = comparison.quant_graph.producer(quant_blob)
    if node is not None and node.type == "Quant":
        quant_blob = node.bottoms[0]
    return quant_blob if quant_blob in comparison.fp32_net.blobs else None


def _page(reports, summary, sections, plots, titles) -> str:
    outputs = [r for r in reports if r.output]
    ranked = by_error_added(reports)[:15]
    top1 = summary.get("top1_agreement")
    head = (f"<h1>Quantization accuracy report</h1><p>FP32 <code>{html.escape(titles['fp32'])}</code> vs quantized "
            f"<code>{html.escape(titles['quant'])}</code>, {summary['samples']} sample(s), "
            f"{summary['blobs_compared']} blobs compared.</p>")
    lines = [f"<li>worst output cosine: <b>{_fmt(summary['worst_output_cosine'])}</b></li>"]
    lines += [f"<li>output <code>{html.escape(name)}</code> "
              + ("(its shape may depend on the data) compared through " + ", ".join(f"<code>{html.escape(b)}</code>"
                                                                                 for b in blobs)
                 if blobs else "does not depend on the input's values (priors): not compared") + "</li>"
              for name, blobs in summary.get("compared_instead", {}).items()]
    if top1 is not None:
        lines.append(f"<li>top-1 agreement: <b>{100 * top1:.2f}%</b></li>")
    parts = [head, "<h2>Summary</h2><ul>" + "".join(lines) + "</ul>", _table(outputs, _COLUMNS),
             "<h2>Layers that add the most error</h2><p>error added = (1 - cosine of the layer's output) - "
             "(1 - cosine of its worst input). Keep the worst ones in float (quant_enable false, or "
             "<code>amct-caffe calibrate --target-cosine</code>) or give them more calibration data.</p>",
             _table(ranked, _COLUMNS), "<h2>Error along the network</h2>", _img("layer_error.png",
                                                                               plots["layer_error.png"])]
    if sections:
        parts.append("<h2>The worst quantized layers</h2>")
    for r, figures in sections:
        parts.append(f"<h3>{html.escape(r.quant_layer)} (cosine {_fmt(r.cosine)}, error added "
                     f"{_fmt(r.error_added)})</h3><div class='plots'>"
                     + "".join(_img(f, plots[f]) for f in figures) + "</div>")
    parts += ["<h2>Every blob</h2>", _table(reports, _COLUMNS),
              f"<script type='application/json' id='summary'>{html.escape(json.dumps(json_safe(summary)))}</script>"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>amct_caffe accuracy report</title>"
            f"<style>{_STYLE}</style></head><body>" + "".join(parts) + "</body></html>\n")
