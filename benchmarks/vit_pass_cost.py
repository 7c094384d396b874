"""The cost of one gradient pass of a vision transformer, per row, against the rows per pass.

One pass is what the IG sweep runs per chunk: a forward and the input gradient of one logit.
Three forms of torchvision's ViT (random weights, eval mode):

- ``frozen, batch-first``: ``prepare_model(m, sequence_first=False)``, the form before
  ``SequenceFirstAttention`` (frozen weights send the q/k/v projection of a transposed input to
  ``aten::bmm``);
- ``frozen, sequence-first``: ``prepare_model(m)``, what the engine runs now;
- ``weights require grad``: the model as loaded, which is what Captum runs.

Times are process CPU seconds per row (``time.process_time``), best of ``--reps`` after a
warm-up, forms interleaved: with ``--threads 1`` this stays meaningful on a busy machine. It
also prints, per form, the time of ``aten::bmm`` and of the matrix products (``torch.profiler``)
in one pass of 3 rows (a vit_b_16 chunk under the 256 MB CPU budget). ``--layers 2`` runs two of
vit_b_16's blocks (same shapes, 1/6 of the time)::

    python benchmarks/vit_pass_cost.py [--layers 12] [--rows 1,3,16] [--threads 1] [--reps 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torchvision.models.vision_transformer import VisionTransformer

from xai_workers import prepare_model


def one_pass(model, rows: int) -> None:
    x = torch.randn(rows, 3, 224, 224).requires_grad_(True)
    torch.autograd.grad(model(x)[:, 0].sum(), x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="encoder blocks (vit_b_16: 12)")
    p.add_argument("--rows", default="1,3,16", help="rows per pass, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = VisionTransformer(224, 16, a.layers, 12, 768, 3072).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    forms = {
        "frozen, batch-first": prepare_model(model, sequence_first=False),
        "frozen, sequence-first": prepare_model(model),
        "weights require grad": model,
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{a.threads} threads; vit_b_16 widths, {a.layers} blocks; CPU s per row of one pass"
    )
    rows = [int(r) for r in a.rows.split(",")]
    for n in rows:
        best = {}
        for form in forms.values():
            one_pass(form, n)  # warm-up
        for _ in range(a.reps):
            for name, form in forms.items():
                t = time.process_time()
                one_pass(form, n)
                best[name] = min(best.get(name, float("inf")), (time.process_time() - t) / n)
        print(f"{n:4d} rows: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.items()), flush=True)
    for name, form in forms.items():  # where the q/k/v projection goes
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_pass(form, 3)  # 3 rows: a vit_b_16 chunk under the 256 MB CPU budget
        ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        print(
            f"{name}: aten::bmm {ops.get('aten::bmm', 0.0):.0f} ms, aten::mm + addmm "
            f"{ops.get('aten::mm', 0.0) + ops.get('aten::addmm', 0.0):.0f} ms (one pass)"
        )


if __name__ == "__main__":
    main()
