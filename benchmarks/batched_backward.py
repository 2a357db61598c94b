"""Task gradients: m sequential backward passes vs one batched (vmap) backward call.

Issue 12 (optional item): could the per-task gradients of the gradient-aggregation
modules come from *one* ``torch.autograd.grad(stack(losses), params,
grad_outputs=eye(m), is_grads_batched=True)`` call instead of ``m`` backward passes
through the same graph (``retain_graph=True`` on all but the last)?

For each case (data set, dtype) one batch of the benchmark's real NequIP model is used
(the model of ``step_cost.py``; forces and stress come from autograd with
``create_graph=True`` inside the model, so every task gradient is a double backward).
Each repetition runs a fresh forward pass and the loss components (exactly what the
training modules' ``training_step`` computes, through nequip's loss ``MetricsManager``),
then the task gradients by one of three variants:

* ``seq``: ``m`` calls ``torch.autograd.grad(L_i, params, retain_graph=i < m-1)``
* ``pkg``: ``m`` calls of the package's own ``TaskGradients.backward`` (what
  ``MultitaskLightningModule.backward`` does: accumulate into preallocated rows)
* ``batched``: one ``torch.autograd.grad(..., is_grads_batched=True)`` call

The variants are interleaved (a fresh seeded random order in every round) so that load
from other processes hits them alike. Two clocks per repetition: the backward part
alone and forward + losses + backward (the part of a training step that the choice
changes; optimizer and aggregation are the same for all). Correctness: on one forward,
the batched gradients are compared with the sequential ones (max abs diff, max relative
diff per task). Every warning of the batched call is recorded, with vmap's fallback
warnings switched on (an op without a batching rule runs a slow per-row loop).

    OMP_NUM_THREADS=1 python -m benchmarks.batched_backward
    OMP_NUM_THREADS=1 python -m benchmarks.batched_backward --compile

``--compile`` adds the alloy in float32 with nequip's train-time compile
(``compile_mode: compile``; its first compile takes minutes on a small CPU, later runs
load it from the compile cache). Eager only: about 3 minutes on 2 vCPUs.

Writes ``benchmarks/results/batched_backward.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from benchmarks import methods as M
from benchmarks import protocol as P
from benchmarks import report as R

VARIANTS = ("seq", "pkg", "batched")


# ----------------------------------------------------------------------------- setup


def build_case(args, dataset: str, dtype: str, compile_mode: str):
    """The training module (our ``MultitaskLightningModule``) and one training batch."""
    import torch

    d = P.DATASETS[dataset]
    # the alloy: 20 validation frames of --frames; ethanol: its own split
    frames, n_train = (args.frames, args.frames - 20) if dataset == "alloy" else (100, 80)
    path, stats = P.data_and_statistics(dataset, frames, n_train, args.r_max, d.type_names)
    type_names, num_tasks = d.type_names, d.num_tasks
    model = P.model_config(dtype, stats, **P.model_arguments(args), type_names=type_names)
    if compile_mode != "eager":
        model["compile_mode"] = compile_mode
    torch.manual_seed(0)
    # the aggregator does not matter here: only the model, the loss and TaskGradients
    module = P.build_module(M.methods()["mean"], model, num_tasks, lr=1e-3)
    dm = P.datamodule(
        path,
        n_train,
        frames - n_train,
        args.batch_size,
        args.r_max,
        shuffle=False,
        type_names=type_names,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    atoms = int(batch["pos"].shape[0])
    return module, batch, num_tasks, atoms


def task_losses(module, batch) -> list:
    """Forward pass and the active loss components, as ``training_loss_components``."""
    delim = module.logging_delimiter
    target = module.process_target(batch, 0, 0)
    output = module(batch)
    loss_dict = module.loss(output, target, prefix=f"train_loss_step{delim}")
    names = list(module.loss.keys())
    return [loss_dict[f"train_loss_step{delim}{n}"] for n in names]


def release(module) -> None:
    from nequip_mtl.train.multitask import release_loss_graph

    release_loss_graph(module.loss)


def grads_seq(losses, params):
    import torch

    m = len(losses)
    return [
        torch.autograd.grad(loss, params, retain_graph=i < m - 1, allow_unused=True)
        for i, loss in enumerate(losses)
    ]


def grads_pkg(losses, storage):
    storage.zero_()
    m = len(losses)
    for i, loss in enumerate(losses):
        storage.backward(i, loss, retain_graph=i < m - 1)


def grads_batched(losses, params, retain_graph: bool = False):
    import torch

    stacked = torch.stack(losses)
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    return torch.autograd.grad(
        stacked,
        params,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
    )


# ----------------------------------------------------------------------------- checks


def _flat_rows(grads_per_task, params):
    """``(m, numel)`` float64 matrix from per-task tuples of per-parameter grads."""
    import torch

    rows = []
    for g in grads_per_task:
        parts = [
            (torch.zeros_like(p) if gi is None else gi).detach().double().reshape(-1)
            for gi, p in zip(g, params)
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def check(module, batch, params, storage) -> dict:
    """Batched vs sequential on one forward; every warning the batched call raised."""
    import torch

    out: dict = {}
    losses = task_losses(module, batch)
    seq = [torch.autograd.grad(x, params, retain_graph=True, allow_unused=True) for x in losses]
    a = _flat_rows(seq, params)
    # package rows on the same graph
    storage.zero_()
    for i, loss in enumerate(losses):
        storage.backward(i, loss, retain_graph=True)
    pkg = storage.matrix(len(losses)).double()
    out["pkg_vs_seq_max_abs"] = float((pkg - a).abs().max())

    # autograd's batched backward uses the legacy vmap (torch._vmap_internals); switch on
    # the fallback warnings of both implementations
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            batched = grads_batched(losses, params)
            out["first_batched_call_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - the error is the measurement
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        out["python_frames"] = [
            f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)
        ][-8:]
        out["warnings"] = _unique_warnings(caught)
        out["vmap_fallback_ops"] = fallback_ops(out["warnings"])
        return out
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
        release(module)
    out["warnings"] = _unique_warnings(caught)
    out["vmap_fallback_ops"] = fallback_ops(out["warnings"])
    b = _flat_rows(
        [[None if g is None else g[i] for g in batched] for i in range(len(seq))], params
    )
    diff = (b - a).abs()
    scale = a.abs().max(dim=1).values.clamp_min(torch.finfo(torch.float64).tiny)
    out["ok"] = True
    out["max_abs_diff"] = float(diff.max())
    out["max_abs_diff_per_task"] = [float(x) for x in diff.max(dim=1).values]
    out["max_rel_diff_per_task"] = [float(x) for x in diff.max(dim=1).values / scale]
    out["rel_norm_diff_per_task"] = [
        float(x) for x in (b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-300)
    ]
    out["grad_norm_per_task"] = [float(x) for x in a.norm(dim=1)]
    return out


_FALLBACK = re.compile(r"not yet implemented the batching rule for (\S+?)\.(?: |$)")


def fallback_ops(warns: list[dict]) -> dict[str, int]:
    """``{op: count}`` of the vmap fallback warnings (ops run by a slow per-row loop)."""
    out: dict[str, int] = {}
    for w in warns:
        m = _FALLBACK.search(w["message"])
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + w["count"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _unique_warnings(caught) -> list[dict]:
    seen: dict[str, dict] = {}
    for w in caught:
        msg = str(w.message)
        key = msg[:400]
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = {"category": w.category.__name__, "message": key, "count": 1}
    return list(seen.values())


# ----------------------------------------------------------------------------- timing


def time_case(module, batch, params, storage, variants, reps: int, warmup: int, seed: int):
    """Per variant: lists of (backward CPU s, step CPU s, backward wall s, step wall s)."""
    rng = random.Random(seed)
    times = {v: {"bwd_cpu": [], "step_cpu": [], "bwd_wall": [], "step_wall": []} for v in variants}
    for r in range(warmup + reps):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            losses = task_losses(module, batch)
            c1, w1 = time.thread_time(), time.perf_counter()
            if v == "seq":
                grads_seq(losses, params)
            elif v == "pkg":
                grads_pkg(losses, storage)
            else:
                grads_batched(losses, params)
            c2, w2 = time.thread_time(), time.perf_counter()
            release(module)
            del losses
            if r >= warmup:
                t = times[v]
                t["bwd_cpu"].append(c2 - c1)
                t["step_cpu"].append(c2 - c0)
                t["bwd_wall"].append(w2 - w1)
                t["step_wall"].append(w2 - w0)
    return times


def _q(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(times: dict) -> dict:
    out = {}
    for v, t in times.items():
        out[v] = {
            k: {
                "median_ms": 1e3 * statistics.median(xs),
                "q25_ms": 1e3 * _q(xs, 0.25),
                "q75_ms": 1e3 * _q(xs, 0.75),
                "min_ms": 1e3 * min(xs),
            }
            for k, xs in t.items()
        }
    if "batched" in times:
        for ref in ("seq", "pkg"):
            if ref not in times:
                continue
            ratios = {}
            for k in times[ref]:
                a, b = times[ref][k], times["batched"][k]
                paired = sorted(y / x for x, y in zip(a, b))
                ratios[k] = {
                    "ratio_of_medians": statistics.median(b) / statistics.median(a),
                    "paired_median": statistics.median(paired),
                    "paired_q25": _q(paired, 0.25),
                    "paired_q75": _q(paired, 0.75),
                }
            out[f"batched_vs_{ref}"] = ratios
    return out


# ----------------------------------------------------------------------------- report


def run_case(args, dataset: str, dtype: str, compile_mode: str) -> dict:
    from nequip_mtl.step import TaskGradients

    t0 = time.perf_counter()
    module, batch, num_tasks, atoms = build_case(args, dataset, dtype, compile_mode)
    params = [p for p in module.parameters() if p.requires_grad]
    storage = TaskGradients(params, num_tasks)
    res: dict = {
        "dataset": dataset,
        "dtype": dtype,
        "compile_mode": compile_mode,
        "tasks": list(module.loss.keys()),
        "num_params": sum(p.numel() for p in params),
        "batch_frames": args.batch_size,
        "batch_atoms": atoms,
    }
    # the first forward (and, under compile, the compile itself) before anything is timed
    losses = task_losses(module, batch)
    grads_seq(losses, params)
    release(module)
    del losses
    res["setup_s"] = time.perf_counter() - t0
    print(f"[{dataset} {dtype} {compile_mode}] set up in {res['setup_s']:.1f} s", flush=True)
    res["check"] = check(module, batch, params, storage)
    chk = res["check"]
    if chk["ok"]:
        print(
            f"  batched vs seq: max abs {chk['max_abs_diff']:.3g}, max rel per task "
            f"{[f'{x:.3g}' for x in chk['max_rel_diff_per_task']]}, "
            f"vmap fallback ops {chk['vmap_fallback_ops']}",
            flush=True,
        )
    else:
        print(f"  batched FAILED: {chk['error'][:300]}", flush=True)
    variants = VARIANTS if chk["ok"] else tuple(v for v in VARIANTS if v != "batched")
    reps = args.reps if compile_mode == "eager" else args.compile_reps
    times = time_case(module, batch, params, storage, variants, reps, args.warmup, args.seed)
    res["reps"] = reps
    res["times"] = times
    res["summary"] = summarize(times)
    s = res["summary"]
    line = ", ".join(f"{v} bwd {s[v]['bwd_cpu']['median_ms']:.0f} ms" for v in variants)
    if "batched_vs_seq" in s:
        r = s["batched_vs_seq"]
        line += (
            f"; batched/seq bwd {r['bwd_cpu']['ratio_of_medians']:.2f}, "
            f"step {r['step_cpu']['ratio_of_medians']:.2f}"
        )
    print("  " + line, flush=True)
    storage.close()
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def _ms(d) -> str:
    return f"{d['median_ms']:.0f} ({d['q25_ms']:.0f}-{d['q75_ms']:.0f})"


def _ratio(r) -> str:
    return f"{r['ratio_of_medians']:.2f} ({r['paired_q25']:.2f}-{r['paired_q75']:.2f})"


def markdown(data: dict) -> str:
    meta, cases = data["meta"], data["cases"]
    args, info = argparse.Namespace(**meta["args"]), meta["machine"]
    command, elapsed = meta["command"], meta["elapsed_s"]
    lines = [
        "# Batched task-gradient backward (`is_grads_batched=True`) vs sequential passes",
        "",
        f"{R.machine_line(info)}; {info['date']}; total {elapsed / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        f"NequIP model of `step_cost.py` (l_max={args.l_max}, {args.num_layers} layers, "
        f"{args.num_features} features, radial MLP 2x{args.radial_width}, "
        f"r_max={args.r_max}); one training batch of {args.batch_size} frames, the same "
        "batch every repetition. Per repetition: a fresh forward pass (forces/stress by "
        "autograd with `create_graph=True`) and nequip's loss components, then the task "
        "gradients by *seq* (m x `torch.autograd.grad(L_i, params, retain_graph=i<m-1)`), "
        "*pkg* (m x the package's `TaskGradients.backward`, as `MultitaskLightningModule`) "
        "or *batched* (one `torch.autograd.grad(stack(L), params, grad_outputs=eye(m), "
        "is_grads_batched=True)`). Variants interleaved in a fresh random order every round; "
        f"{args.warmup} warm-up round(s) dropped. CPU time of the (single) compute thread, "
        "median ms with the interquartile range in brackets; ratios: ratio of medians, "
        "with the IQR of the per-round paired ratios in brackets. *step* = forward + "
        "losses + task gradients (optimizer and aggregation are the same for every variant).",
        "",
        "| data | dtype | mode | tasks | atoms | reps | seq bwd ms | pkg bwd ms "
        "| batched bwd ms | batched/seq bwd | batched/pkg bwd | seq step ms "
        "| batched step ms | batched/seq step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if "summary" not in c:
            continue
        s = c["summary"]
        has_b = "batched" in s
        na = "n/a"
        lines.append(
            f"| {c['dataset']} | {c['dtype']} | {c['compile_mode']} | {len(c['tasks'])} "
            f"| {c['batch_atoms']} | {c['reps']} | {_ms(s['seq']['bwd_cpu'])} "
            f"| {_ms(s['pkg']['bwd_cpu'])} "
            f"| {_ms(s['batched']['bwd_cpu']) if has_b else na} "
            f"| {_ratio(s['batched_vs_seq']['bwd_cpu']) if has_b else na} "
            f"| {_ratio(s['batched_vs_pkg']['bwd_cpu']) if has_b else na} "
            f"| {_ms(s['seq']['step_cpu'])} "
            f"| {_ms(s['batched']['step_cpu']) if has_b else na} "
            f"| {_ratio(s['batched_vs_seq']['step_cpu']) if has_b else na} |"
        )
    lines += [
        "",
        "## Correctness of the batched gradients (same forward, vs seq)",
        "",
        "| data | dtype | mode | result | max abs diff | max rel diff per task "
        "| rel. norm diff per task | pkg vs seq max abs | warnings of the batched call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        chk = c.get("check")
        if chk is None:
            lines.append(
                f"| {c['dataset']} | {c['dtype']} | {c['compile_mode']} | "
                f"not measured: {c.get('error', '?')[:200]} | | | | | |"
            )
            continue
        ops = chk.get("vmap_fallback_ops", {})
        other = [w for w in chk["warnings"] if not _FALLBACK.search(w["message"])]
        warns = ", ".join(f"`{op}` x{n}" for op, n in ops.items())
        warns = f"slow-loop fallback for {len(ops)} op(s): {warns}" if ops else ""
        warns += (
            "".join(f"; {w['category']} x{w['count']}: {w['message'][:160]}" for w in other)
            .replace("|", "/")
            .replace("\n", " ")
        )
        pkg = f"{chk['pkg_vs_seq_max_abs']:.2g}"
        if chk["ok"]:
            rel = ", ".join(f"{x:.1e}" for x in chk["max_rel_diff_per_task"])
            nrm = ", ".join(f"{x:.1e}" for x in chk["rel_norm_diff_per_task"])
            lines.append(
                f"| {c['dataset']} | {c['dtype']} | {c['compile_mode']} | ok "
                f"| {chk['max_abs_diff']:.2g} | {rel} | {nrm} | {pkg} | {warns or 'none'} |"
            )
        else:
            err = chk["error"].replace("|", "/").replace("\n", " ")[:400]
            lines.append(
                f"| {c['dataset']} | {c['dtype']} | {c['compile_mode']} | **error**: `{err}` "
                f"| | | | {pkg} | {warns or 'none'} |"
            )
    lines += [
        "",
        "Set-up per case (model build, first forward/backward, under compile the compile):",
    ]
    lines += [
        f"- {c['dataset']} {c['dtype']} {c['compile_mode']}: "
        + (f"{c['setup_s']:.0f} s" if "setup_s" in c else f"failed: {c.get('error', '?')}")
        for c in cases
    ]
    for c in cases:
        frames = (c.get("check") or c).get("python_frames")
        if frames:
            lines += [
                "",
                f"Innermost Python frames of the error ({c['dataset']} {c['dtype']} "
                f"{c['compile_mode']}):",
                "",
                *[f"- `{f.split('site-packages/')[-1]}`" for f in frames],
            ]
    return "\n".join(lines) + "\n"


def report(data: dict, out: Path) -> None:
    R.write_text(out.with_suffix(".md"), markdown(data), echo=False)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["alloy", "ethanol"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--compile", action="store_true", help="also compile_mode: compile")
    parser.add_argument("--compile-dtypes", nargs="+", default=["float32"])
    parser.add_argument("--compile-datasets", nargs="+", default=["alloy"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--compile-reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    P.add_run_arguments(parser, frames=200, num_layers=3, radial_width=64, lr=None)
    parser.add_argument("--out", default=None, help="default results/batched_backward")
    R.add_from_json(parser, what="the md")
    args = parser.parse_args(argv)
    if args.from_json:
        return R.from_json(args.from_json, args.out, report)
    args.out = args.out or str(P.RESULTS / "batched_backward")
    command = R.command("batched_backward", sys.argv[1:] if argv is None else argv)

    P.init_torch()
    info = P.machine_info()
    t0 = time.perf_counter()
    plan = [(d, t, "eager") for d in args.datasets for t in args.dtypes]
    if args.compile:
        # the training module's __init__ moves compiles into the package's own cache
        # namespace (nequip_mtl.train._compile), as in training
        plan += [(d, t, "compile") for d in args.compile_datasets for t in args.compile_dtypes]
    cases = []
    for dataset, dtype, mode in plan:
        try:
            cases.append(run_case(args, dataset, dtype, mode))
        except Exception as e:  # noqa: BLE001 - record and go on with the other cases
            print(f"[{dataset} {dtype} {mode}] FAILED: {type(e).__name__}: {e}", flush=True)
            cases.append(
                {
                    "dataset": dataset,
                    "dtype": dtype,
                    "compile_mode": mode,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                    "python_frames": [
                        f"{f.filename}:{f.lineno} {f.name}"
                        for f in traceback.extract_tb(e.__traceback__)
                    ][-8:],
                }
            )
    elapsed = time.perf_counter() - t0
    info = {**info, "loadavg_end": os.getloadavg(), "date": P.now()}
    out = Path(args.out)
    meta = {"command": command, "args": vars(args), "machine": info, "elapsed_s": elapsed}
    R.write_json(out.with_suffix(".json"), {"meta": meta, "cases": cases})
    report({"meta": meta, "cases": cases}, out)
    print(f"wrote {out.with_suffix('.json')} and .md ({elapsed / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
