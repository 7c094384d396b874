"""benchmarks/gpu.py --smoke: the GPU measurement runs unchanged on a CPU and prints every field,
so the command the lead runs on a GPU cannot rot."""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("ResNet-18 (smoke)", "ViT 2 layers (smoke)")
RATES = ("trio fp32 img/s", "trio bf16 img/s", "JPEG decode img/s, CPU stage, 1 core",
         "JPEG decode img/s, decode_jpeg on cpu")  # fmt: skip
MEMORY = ("peak memory fp32 (GiB)", "peak memory bf16 (GiB)")
ERRORS = tuple(
    f"max map error bf16 vs fp32, {m}" for m in ("saliency", "integrated_gradients", "gradcam")
)


def test_smoke_prints_every_field_with_sane_numbers():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--device", "cpu"],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "random weights (no downloads)" in out.splitlines()[0]
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0] == f"| field | {' | '.join(MODELS)} |"
    table = {}
    for ln in lines[2:]:  # after the header and its rule
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0]] = dict(zip(MODELS, cells[1:], strict=True))
    expected = {*RATES, *MEMORY, *ERRORS, "bf16 rows sent back to fp32", "job img/s (n1 rows)",
                "job img/s steady (n2 - n1)"}  # fmt: skip
    assert set(table) == expected
    for model in MODELS:
        col = {k: v[model] for k, v in table.items()}
        for k in RATES:
            assert float(col[k]) > 0, (model, k)
        for k in MEMORY:  # on a CPU: the process's peak RSS, from 0.1 GiB (torch) to 64 GiB
            assert 0.05 < float(col[k]) < 64, (model, k)
        sent = re.fullmatch(r"(\d+)/4", col["bf16 rows sent back to fp32"])
        assert sent, col["bf16 rows sent back to fp32"]
        for k in ERRORS:
            # relative to each map's own max |fp32|; NaN only when every row went back to fp32;
            # bf16 (8 bits of mantissa) on these nets stays well under 1 (a map of the wrong
            # row or method would be off by about 1 or more)
            err = float(col[k])
            assert (math.isnan(err) and sent[1] == "4") or 0 <= err < 1, (model, k, err)
    # the job runs once on the CNN in smoke mode, through Ray: a positive rate
    assert float(table["job img/s (n1 rows)"][MODELS[0]]) > 0
    assert table["job img/s (n1 rows)"][MODELS[1]].startswith("not run")
    assert table["job img/s steady (n2 - n1)"][MODELS[0]].startswith("not run")
    assert "decoding on the device" in out
