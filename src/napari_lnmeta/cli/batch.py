"""``lnmeta batch``: a cohort through one pipeline step on a Dask cluster."""

from __future__ import annotations

import sys

from . import add_out, command, warn


@command("batch", help="Run a pipeline step over a cohort (folder, glob or CSV) on a Dask cluster")
def batch(p):
    p.add_argument("cohort", help="a folder of slides, a quoted glob ('slides/*.svs') or a CSV "
                   "with a 'slide' column (optional 'ihc', 'label', 'mpp' and clinical "
                   "columns)")
    p.add_argument("--step", required=True,
                   help="tissue | predict | register | extract-features | mil")
    add_out(p, "output folder: one sub-folder per slide")
    p.add_argument("--scheduler", default=None,
                   help="address of an existing Dask scheduler (tcp://host:8786); "
                   "default: a LocalCluster on this machine; 'sync' runs in this process")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers")
    p.add_argument("--threads", type=int, default=None, help="threads per LocalCluster worker")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed slide (default 1)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the step (repeatable), e.g. --param model=m.safetensors")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 µm/px for the slides whose file does not give one (slides "
                        "that have it keep theirs; a CSV 'mpp' column sets it per slide)")
    p.add_argument("--overwrite", action="store_true",
                   help="run finished slides again (each old folder is replaced only once its "
                   "new one is complete); folders and files not written by a cohort run are "
                   "never touched")

    def run(args):
        from ..cohort import load_cohort, parse_params, run_cohort_job
        from ..progress import run as drive

        params = parse_params(args.param)
        if args.mpp is not None:
            if not args.mpp > 0:
                from ..errors import InputError

                raise InputError(f"--mpp {args.mpp}: expected a positive number of µm per "
                                 "pixel")
            params["mpp"] = args.mpp
        items = load_cohort(args.cohort)

        def started(client):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)

        def show(pr):
            rec = pr.partial
            line = f"[{pr.done}/{pr.total}] {pr.message}"
            if rec and rec.get("status") == "failed":
                line += f" — {rec.get('error')}"
            print(line, file=sys.stderr, flush=True)

        report = drive(run_cohort_job(items, args.step, args.out, params=params,
                                 scheduler=args.scheduler, n_workers=args.workers,
                                 threads_per_worker=args.threads, retries=args.retries,
                                 on_start=started, overwrite=args.overwrite), show)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(report.counts.items()))
        print(f"{len(report.records)} slides: {counts}; summary in {report.out / 'cohort_summary.csv'}")
        for r in report.failed():
            print(f"failed: {r['id']}: {r.get('error')}", file=sys.stderr)
        for r in report.without_mpp():
            warn(f"{r['id']}: {r['warning']}")
        return 1 if report.failed() else 0

    return run

