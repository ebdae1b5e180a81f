#!/usr/bin/env python3
"""How far are `strata plan`'s estimates from real GPU runs?

Reads every run record in benchmarks/results/*.json, predicts the same model / GPU / layout / workload with the
planner, and prints measured vs predicted output tokens/s, time per output token and time to first token, with
the error per metric (flagged when beyond 25%). --fit refits the planner's constants to the runs and
--write-constants saves them for `strata plan --constants FILE`.

The record fields it reads are listed by `--fields` (and in strata/plan/calibrate.py, docs/PARALLELISM.md).

    python benchmarks/plan_vs_measured.py [--results benchmarks/results] [--constants FILE] [--fit]
                                          [--write-constants FILE] [--json] [--fields]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from strata.plan.calibrate import METRICS, RECORD_FIELDS, TOLERANCE, compare, fit, load_runs, loss
from strata.plan.constants import Constants

HERE = os.path.dirname(os.path.abspath(__file__))


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if metric == "output_tok_s" else f"{v:.2f}"


def table(comparisons, notes: bool = True) -> str:
    notes = _notes(comparisons) if notes else []
    rows = [["run", "gpu", "model", "layout", "workload"] + [f"{m} meas/pred/err" for m in METRICS]]
    for c in comparisons:
        r = c.run
        cells = [os.path.basename(r.source), r.gpu, r.model, r.layout.label, r.workload_name]
        for m in METRICS:
            if m in r.not_compared:
                v = r.record.get("_shown", {}).get(m)
                cells.append(f"({_fmt(v, m)}) n/c")
            elif m not in r.measured:
                cells.append("-")
            elif c.problem:
                cells.append(f"{_fmt(r.measured[m], m)} / ? ")
            else:
                e = c.error[m]
                flag = " !" if abs(e) > TOLERANCE else ""
                cells.append(f"{_fmt(r.measured[m], m)} / {_fmt(c.predicted[m], m)} / {e:+.0%}{flag}")
        if not r.fit:
            cells[0] += " *"
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    for c in comparisons:
        if c.problem:
            lines.append(f"{c.run.source}: {c.problem}")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines)


def _notes(comparisons) -> list[str]:
    out, seen = [], set()
    for c in comparisons:
        r = c.run
        for line in ([r.note] if r.note else []) + [f"{m} n/c: {w}" for m, w in r.not_compared.items()]:
            if line not in seen:
                seen.add(line)
                out.append(f"  {os.path.basename(r.source)}: {line}")
    if any(not c.run.fit for c in comparisons):
        out.append("  * compared, not used by --fit")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of run records")
    ap.add_argument("--constants", default=None, help="planner constants JSON to compare with (default: built-in)")
    ap.add_argument("--fit", action="store_true", help="refit the constants to the recorded runs")
    ap.add_argument("--write-constants", default=None, help="write the fitted constants to this JSON file")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--fields", action="store_true", help="list the record fields this script reads and exit")
    args = ap.parse_args(argv)

    if args.fields:
        for k, v in RECORD_FIELDS.items():
            print(f"{k:36s} {v}")
        return 0
    constants = Constants.from_json(args.constants) if args.constants else Constants()
    runs, skipped, n_files = load_runs(args.results)
    if not runs:
        msg = (f"No recorded GPU runs to compare: {n_files} JSON file(s) in {args.results}"
               + (f", none usable ({len(skipped)} skipped)" if skipped else "") + ".\n"
               "Each GPU run should be recorded there as JSON with at least: device, model, workload, tp, pp, dp "
               "and one of output_tok_s / tpot_ms / ttft_ms (--fields lists every field).")
        if args.json:
            print(json.dumps({"runs": [], "skipped": skipped, "files": n_files, "message": msg}, indent=2))
        else:
            print(msg)
            for s in skipped:
                print(f"  skipped {s}")
        return 0
    comps = compare(runs, constants)
    out = {"constants": constants.to_dict(), "comparisons": [c.to_dict() for c in comps], "skipped": skipped,
           "loss": loss(comps)}
    within = [abs(e) <= TOLERANCE for c in comps for e in c.error.values()]
    by_metric = {m: [abs(c.error[m]) <= TOLERANCE for c in comps if m in c.error] for m in METRICS}
    if args.fit:
        fitted, freed = fit(runs, constants)
        fcomps = compare(runs, fitted)
        out["fitted"] = {"constants": fitted.to_dict(), "freed": freed, "loss": loss(fcomps),
                         "comparisons": [c.to_dict() for c in fcomps]}
        if args.write_constants:
            with open(args.write_constants, "w") as f:
                json.dump({"constants": fitted.to_dict(),
                           "fitted_from": [os.path.basename(r.source) for r in runs if r.fit],
                           "freed": freed}, f, indent=2)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{len(runs)} run(s) from {n_files} file(s); constants: {args.constants or 'built-in defaults'}")
    print(table(comps))
    print(f"{sum(within)}/{len(within)} figures within {TOLERANCE:.0%} ("
          + ", ".join(f"{m} {sum(v)}/{len(v)}" for m, v in by_metric.items() if v) + ")")
    for s in skipped:
        print(f"  skipped {s}")
    if args.fit:
        f = out["fitted"]
        changed = {k: v for k, v in f["constants"].items() if v != dataclasses.asdict(constants)[k]}
        fw = [abs(e) <= TOLERANCE for c in fcomps for e in c.error.values()]
        print(f"\nfitted on the {sum(r.fit for r in runs)} runs not marked * ({', '.join(f['freed'])} free; "
              f"constants no run is sensitive to stay as they are): {changed or 'no change'}; "
              f"loss {out['loss']:.4f} -> {f['loss']:.4f}; {sum(fw)}/{len(fw)} figures within {TOLERANCE:.0%}")
        print(table(fcomps, notes=False))
        if args.write_constants:
            print(f"wrote {args.write_constants}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
