"""The step benchmark's output from its JSON: the markdown table (printed last, and ``<out>.md``), the
plot, and several JSONs merged (e.g. a ``--phases fixed`` run and a ``--phases search`` run)."""
from __future__ import annotations

import json

from harness import fmt, markdown_table, pyplot, save_figure

from .models import ARCHS, LABELS, VARIANTS


def _get(r, phase, key):
    return (r.get(phase) or {}).get(key)


def load(spec):
    """One JSON, or several (comma-separated) merged per (architecture, variant): e.g. a ``--phases fixed``
    run and a ``--phases search`` run. A phase that is "ok" in a later file replaces one that is not."""
    datas = []
    for path in spec.split(","):
        with open(path) as f:
            datas.append(json.load(f))
    if len(datas) == 1:
        return datas[0]
    meta = dict(datas[0]["meta"], merged_from=spec.split(","),
                phases=sorted({p for d in datas for p in d["meta"].get("phases", [])}),
                elapsed_s=round(sum(d["meta"].get("elapsed_s") or 0 for d in datas), 1))
    recs = {}
    for d in datas:
        for r in d["results"]:
            x = recs.setdefault((r["arch"], r["variant"]), {k: r[k] for k in ("arch", "variant", "label")})
            for ph in ("fixed", "search"):
                if ph in r and (ph not in x or x[ph].get("status") != "ok"):
                    x[ph] = r[ph]
    order = list(ARCHS)
    results = sorted(recs.values(), key=lambda r: (order.index(r["arch"]) if r["arch"] in order else 99,
                                                    VARIANTS.index(r["variant"])))
    return dict(meta=meta, results=results)


def _row(r, rows):
    f, s = r.get("fixed") or {}, r.get("search") or {}
    ref = next((_get(x, "fixed", "step_ms") for x in rows if x["arch"] == r["arch"] and x["variant"] == "compile"),
               None)
    ms = f.get("step_ms")
    tok = f"{f['batch']}×{f['seq']} = {f['tokens']}" if f.get("tokens") else ""
    if s.get("max_tokens") is not None:
        mt = f"{s['max_tokens']} ({s['max_seqs']}×{s['seq']})"
        if not s.get("exact"):
            mt = "≥ " + mt + f" [{s.get('status')}]"
    else:
        mt = s.get("status", "")
    c = f if "fixed" in r else s  # compile facts: from the fixed phase, else from a search-only run
    graphs = f"{c['graphs']} / {c['graph_breaks']}" if "graphs" in c else ""
    rw = f"{c['rewrites']} ({c['misses']} missed)" if r["variant"] == "cce" and "rewrites" in c else ""
    status = f.get("status", "") if "fixed" in r else s.get("status", "")
    if f.get("error"):
        status += ": " + f["error"][:80].replace("|", "/")
    if f.get("recompiled"):
        status += " (recompiled at the full batch)"
    peak = f.get("peak_mb")
    return [r["arch"], r["label"], tok, fmt(ms, ".1f"), fmt(ms / ref if ms is not None and ref else None, ".2f"),
            fmt(peak / 1024 if peak is not None else None, ".2f"), fmt(f.get("loss_first"), ".4f"),
            fmt(f.get("grad_norm_first"), ".4f"), fmt(c.get("compile_s"), ".1f"), graphs, rw, mt, status]


def table(data):
    """The markdown table: one row per architecture x variant, the run's facts above, the models below."""
    rows = data["results"]
    lines = markdown_table(["architecture", "variant", "tokens/step", "step ms", "× torch.compile", "peak GB",
                            "loss (step 1)", "grad norm (step 1)", "compile s", "graphs / breaks", "cce rewrites",
                            "max tokens/step", "status"], [_row(r, rows) for r in rows], align="ll" + "r" * 10 + "l")
    m = data["meta"]
    head = (f"{m.get('gpu', m['device'])}, {m['precision']}, torch {m['versions'].get('torch')}, transformers "
            f"{m['versions'].get('transformers')}, {m['date']}, {m.get('elapsed_s')} s; step = {m['step']}; "
            f"compiled: {m['compiled']}{' (batch dim dynamic)' if m.get('dynamic_batch') else ''}")
    models = {}
    for r in rows:
        x = next((r[ph] for ph in ("fixed", "search") if (r.get(ph) or {}).get("params_M")), None)
        if x and r["arch"] not in models:
            models[r["arch"]] = (f"{r['arch']} {x['params_M']}M params, {x['layers']} layers, V={x['vocab']}, "
                                 f"{x['param_dtype']}, attention {x['attn_impl']}")
    skipped = m.get("skipped") or {}
    tail = ([""] + ["models: " + "; ".join(models.values())] if models else []) + \
        ([f"not run: {', '.join(f'{k} ({v})' for k, v in skipped.items())}"] if skipped else [])
    return "\n".join([head, ""] + lines + tail)


def plot(data, path):
    """Bars per architecture and variant: step ms, peak GB, max tokens/step (the panels that have data)."""
    plt = pyplot()
    if plt is None:
        return False
    res = data["results"]
    archs = list(dict.fromkeys(r["arch"] for r in res))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in res)]
    panels = [("step ms at the fixed tokens/step", lambda r: _get(r, "fixed", "step_ms"), "fixed"),
              ("peak GB at the fixed tokens/step",
               lambda r: None if _get(r, "fixed", "peak_mb") is None else _get(r, "fixed", "peak_mb") / 1024, "fixed"),
              ("max tokens/step (thousands)",
               lambda r: None if _get(r, "search", "max_tokens") is None else _get(r, "search", "max_tokens") / 1e3,
               "search")]
    panels = [p for p in panels if any(p[1](r) is not None for r in res)] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, (title, get, phase) in zip(axes[0], panels):
        top = 0.0
        for j, v in enumerate(variants):
            for i, arch in enumerate(archs):
                r = next((x for x in res if x["arch"] == arch and x["variant"] == v), None)
                if r is None:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                y = get(r)
                if y is None:
                    st = (r.get(phase) or {}).get("status", "-")
                    ax.annotate(st.split(" ")[0][:10], (x, 0), rotation=90, ha="center", va="bottom", fontsize=7,
                                color=f"C{j}")
                    continue
                hatch = "//" if phase == "search" and not (r.get("search") or {}).get("exact") else None
                ax.bar(x, y, width, color=f"C{j}", hatch=hatch, label=LABELS[v] if i == 0 else None)
                top = max(top, y)
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(archs)))
        ax.set_xticklabels(archs, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, top * 1.12 or 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    m = data["meta"]
    fig.suptitle(f"one training step (forward + backward + AdamW), {m.get('gpu', m['device'])}, {m['precision']}, "
                 f"torch {m['versions'].get('torch')}, {m['date'][:10]}"
                 + ("\nhatched: lower bound (search cut short)" if panels[-1][2] == "search" else ""), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)
    return True
