"""What the benchmarks write: formatted cells, tables, the JSON record (with where it ran), plots."""
from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


# ---- cells and tables ------------------------------------------------------------------------------

def fmt(x, spec="", missing=""):
    """``format(x, spec)``; None and NaN give ``missing``, right-aligned to the spec's width if it has one."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return missing.rjust(int(width)) if width else missing
    return format(x, spec)


def ratio(a, b, spec=".2f", missing=""):
    """``a / b`` formatted; ``missing`` when either is absent or ``b`` is 0."""
    return fmt(a / b if (a is not None and b) else None, spec, missing)


def markdown_table(header, rows, align=None) -> list:
    """Lines of a markdown table; ``align`` one character per column, "l" or "r" (default: the first column
    left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(map(str, header)) + " |", rule] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


# ---- where it ran -----------------------------------------------------------------------------------

def gpu_name(device="cuda"):
    import torch

    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def git_commit():
    """The checkout's commit, ``-dirty`` when the tree differs from it (a copied tree whose git metadata is older
    than its files reads as ``<old commit>-dirty``: ``sources_hash`` then says what ran)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, cwd=ROOT, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def sources_hash(top=None):
    """sha256 (16 hex digits) of the ``.py`` files (names and contents) of the ``cce_inductor`` package in
    folder ``top`` (default: the one ``import cce_inductor`` finds): what ran, even where a copied tree's git
    metadata is stale."""
    if top is None:
        spec = importlib.util.find_spec("cce_inductor")
        if spec is None or not spec.submodule_search_locations:
            return None
        top = list(spec.submodule_search_locations)[0]
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, top).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def versions(packages=("triton",), cce_dir=None):
    """torch, python, the named distributions that are installed, the git commit and the hash of the
    ``cce_inductor`` sources (in ``cce_dir``, default: the importable package)."""
    import torch
    from importlib.metadata import version

    out = dict(torch=torch.__version__, python=sys.version.split()[0])
    for name in packages:
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            pass
    out["git"] = git_commit()
    out["cce_inductor_sources"] = sources_hash(cce_dir)
    return out


def now(date_only=False):
    d = datetime.datetime.now()
    return d.date().isoformat() if date_only else d.isoformat(timespec="seconds")


# ---- files ----------------------------------------------------------------------------------------

def write_json(path, data):
    """``data`` as indented JSON at ``path``, replaced in one step (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def out_path(name):
    """``$OUT/name`` (``./name`` without ``$OUT``), its folder created."""
    out = os.environ.get("OUT", ".")
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return None
    return plt


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
