"""Command line: `pokestudy data info`, `train`, `run`, `report`, `compare`, `studies`, `bench`, `dashboard`.

User mistakes surface as `UserError`: one line on stderr, exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from pokestudy import UserError


def _data_info(args: argparse.Namespace) -> None:
    from pokestudy.data import prepare

    data = prepare(args.data, args.res, near_duplicates=args.near_duplicates)
    m = data.manifest
    info = {k: m[k] for k in ("classes", "images", "per_class", "skipped", "duplicates", "conflicts", "near_duplicates",
                              "splits", "train_only", "extras", "fingerprint", "cache")}
    if args.json:
        print(json.dumps({**info, "near_duplicate_groups": data.near_groups}))
        return
    pc = info["per_class"]
    print(f"classes     {info['classes']}\nimages      {info['images']} "
          f"(per class min {pc['min']}, median {pc['median']}, max {pc['max']})\n"
          f"duplicates  {len(info['duplicates'])} removed (the same bytes; the first copy is kept)")
    _listed([f"{d['path']} = {d['copy_of']}" for d in info["duplicates"]])
    print(f"conflicts   {len(info['conflicts'])} (the same bytes under different classes: no copy is used)")
    _listed([" = ".join(c["paths"]) for c in info["conflicts"]])
    near = info["near_duplicates"]
    if near["bits"] or near["crops"]:
        how = " or ".join([f"within {near['bits']} of 64 pHash bits"] * bool(near["bits"])
                          + [f"one picture cropped ({near['crop_groups']} groups only so)"] * near["crops"])
        print(f"near-dups   {near['groups']} groups of {near['images']} images {how} "
              f"(largest {near['largest']}, {near['across_classes']} across classes): kept, each group in one split; "
              f"{near['straddled_exact_split']} would straddle splits under the exact-bytes rule")
        _listed([" ~ ".join(example) for example in near["examples"]], most=3)
        if near["examples_across_classes"]:
            print("  across classes (chance look-alikes, or one picture filed under two classes):")
            _listed([" ~ ".join(example) for example in near["examples_across_classes"]])
        if near["groups"] > len(near["examples"]):
            print("  (--json lists every group with its paths)")
    else:
        print("near-dups   not grouped (exact bytes only; --near-duplicates N groups images within N of 64 bits)")
    print(f"skipped     {len(info['skipped'])} files")
    _listed([f"{s['path']}: {s['reason']}" for s in info["skipped"]])
    print("splits      " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    if info["train_only"]:
        print(f"train only  {', '.join(info['train_only'])} (fewer than 3 groups of pictures: too few to split)")
    for name, n in info["extras"].items():
        print(f"extra set   {name} {n}")
    print(f"fingerprint {info['fingerprint']}\ncache       {info['cache']}")


def _listed(lines: list[str], most: int = 12) -> None:
    """Indented lines under a `data info` heading; a long list is cut, `--json` has all of it."""
    for line in lines[:most]:
        print(f"  {line}")
    if len(lines) > most:
        print(f"  … {len(lines) - most} more (--json lists them all)")


def _train(args: argparse.Namespace) -> None:
    from pokestudy.data import prepare
    from pokestudy.train import Diverged, TrialConfig, default_precision, resolve_device, run_trial

    names = set(TrialConfig.model_fields)
    settings = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if settings.get("precision", "auto") == "auto":  # the hardware's default, as a new study gets it
        settings["precision"] = default_precision(resolve_device(settings.get("device", "auto")))
    cfg = TrialConfig(**settings)
    cfg.check_model()
    data = prepare(args.data, cfg.res, evals=_evals(args.eval), near_duplicates=args.near_duplicates)
    columns = ["epoch", "train_acc", "val_acc", "test_acc", "gap", *[f"{n}_acc" for n in data.sets if n not in
                                                                   ("train", "val", "test")], "images_per_s"]
    if not args.json:
        print("  ".join(f"{c:>12}" for c in columns))

    def show(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            cells = (f"{record[c]:>12.3f}" if c != "epoch" else f"{record[c]:>12d}" for c in columns)
            print("  ".join(cells), flush=True)

    try:
        summary = run_trial(cfg, data, show)
    except Diverged as e:
        raise UserError(str(e)) from None
    final, best = summary["final"], summary["best"]
    if args.json:
        print(json.dumps({"final": True, **final, "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                          "converged": summary["converged"]}))
    else:
        rises = f"train {100 * final['train_acc_rise']:+.1f}, val {100 * final['val_acc_rise']:+.1f} points"
        state = (f"converged (last-quarter rise: {rises})" if summary["converged"] else
                 f"NOT converged: still rising over the last quarter ({rises}); try a larger --epochs")
        print(f"\n{cfg.arch}, augment={cfg.augment}: train {final['train_acc']:.3f}, test {final['test_acc']:.3f}, "
              f"gap {final['gap']:+.3f} after {final['epoch']} epochs, {state} ({final['seconds']:.0f} s); "
              f"best val {best['val_acc']:.3f} at epoch {best['epoch']}")


def _evals(pairs: list[str] | None) -> dict[str, str]:
    """`--eval NAME=PATH`, repeated: outside evaluation sets."""
    out = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--eval {pair!r}: expected NAME=PATH, e.g. --eval kaggle=~/PokemonData")
        out[name] = path
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pokestudy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect a data source").add_subparsers(dest="data_command", required=True)
    info = data.add_parser("info", help="classes, images, skipped files, duplicates, split sizes, cache path")
    info.add_argument("--data", default="sprites", help="sprites (default), synthetic[:k=v,...] or a folder PATH")
    info.add_argument("--res", type=int, default=64)
    info.add_argument("--json", action="store_true")
    _near_arg(info)
    info.set_defaults(func=_data_info)

    t = sub.add_parser("train", help="train one trial and print every epoch")
    t.add_argument("--data", default="sprites")
    t.add_argument("--arch", required=True)
    t.add_argument("--augment")
    for flag, kind in [("epochs", int), ("res", int), ("width", int), ("lr", float), ("weight-decay", float),
                       ("dropout", float), ("label-smoothing", float), ("batch-size", int), ("seed", int),
                       ("warmup", int), ("decay", str), ("steps-per-epoch", int), ("settle", float),
                       ("eval-subset", int), ("train-fraction", float)]:
        t.add_argument(f"--{flag}", type=kind)
    t.add_argument("--optimizer")
    t.add_argument("--eval", action="append", metavar="NAME=PATH",
                   help="an outside evaluation set (a folder, one sub-folder per class); repeatable")
    t.add_argument("--device")
    t.add_argument("--precision",
                   help="fp32, bf16 or auto (default: bf16 where the hardware has it natively, else fp32)")
    _near_arg(t)
    t.add_argument("--json", action="store_true", help="one JSON object per epoch, then a final summary")
    t.set_defaults(func=_train)

    r = sub.add_parser("run", help="run a study with Ray Tune, every epoch stored in Optuna")
    r.add_argument("--study", required=True, help="a shipped study's name (`pokestudy studies --available`) "
                                                  "or a path to a .yaml spec")
    r.add_argument("--data", help="override the spec's data source")
    r.add_argument("--eval", action="append", metavar="NAME=PATH",
                   help="an outside evaluation set (a folder, one sub-folder per class), evaluated every epoch; "
                        "repeatable")
    _near_arg(r)
    r.add_argument("--address", help="an existing Ray cluster (default: a local Ray sized to this machine)")
    r.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    r.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (overrides the spec)")
    r.add_argument("--restart", action="store_true",
                   help="keep the stored study of this name as NAME.archived-TIME and start it over")
    r.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    r.add_argument("--budget", type=_duration, metavar="DURATION",
                   help="wall-clock budget, e.g. 90s, 45m, 2h: start no trial that cannot finish in it (by measured "
                        "trial times); a rerun continues")
    _storage_args(r, study_name=True)
    r.set_defaults(func=_run)

    rep = sub.add_parser("report", help="rebuild tables and figures of a study from the storage alone")
    rep.add_argument("--study", required=True)
    rep.add_argument("--format", default="csv,md,tex,json", help="comma-separated: csv, md, tex, json")
    _storage_args(rep)
    rep.set_defaults(func=_report)

    cmp = sub.add_parser("compare", help="two runs of one design on different data rules: how test accuracy and "
                                         "the gap moved, per condition, with corrected intervals")
    cmp.add_argument("first", help="the study to compare from, e.g. pokemondata-exact")
    cmp.add_argument("second", help="the study to compare to, e.g. pokemondata")
    _storage_args(cmp)
    cmp.set_defaults(func=_compare)

    ex = sub.add_parser("export", help="copy a study (tuning stages, trials, attached files) into a folder that "
                                       "`pokestudy import` reads into another storage")
    ex.add_argument("--study", required=True)
    ex.add_argument("dest", nargs="?", type=Path, help="the folder (default: RESULTS/STUDY/archive)")
    _storage_args(ex)
    ex.set_defaults(func=lambda a: _api("export_study", a.study, a.dest, storage=a.storage, results=a.results))

    im = sub.add_parser("import", help="copy an exported study folder into the storage: a rerun continues it")
    im.add_argument("src", type=Path, help="a folder written by `pokestudy export`")
    _storage_args(im)
    im.set_defaults(func=lambda a: _api("import_study", a.src, storage=a.storage, results=a.results))

    new = sub.add_parser("new", help="write NAME.yaml, a commented starting spec for a study of your own")
    new.add_argument("name", help="the study's name (letters, digits, . _ -)")
    new.set_defaults(func=_new)
    st = sub.add_parser("studies", help="list the studies in a storage (or the specs with --available)")
    st.add_argument("--available", action="store_true", help="list the study specs shipped in studies/")
    _storage_args(st)
    st.set_defaults(func=_studies)

    b = sub.add_parser("bench", help="measure the engine, the study overhead and the time to a first epoch")
    b.add_argument("--data", default="sprites:frames=4")
    b.add_argument("--res", type=int, default=64)
    b.add_argument("--arch", default="cnn")
    b.add_argument("--trials", type=int, default=8, help="short trials in the study-overhead measurement")
    b.add_argument("--precision", default="auto", help="the engine's: fp32, bf16 or auto (default: bf16 where the "
                                                       "hardware has it natively, else fp32); the FLOP roof is a "
                                                       "matmul of the same precision")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bench)

    d = sub.add_parser("dashboard", help="open optuna-dashboard on the study storage")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    _storage_args(d)
    d.set_defaults(func=_dashboard)
    return p


def _near_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--near-duplicates", metavar="BITS[+crops]",
                   help="group images whose perceptual hashes differ in at most BITS of 64, and with +crops also "
                        "those the crop matcher finds (tight crops, borders, new backgrounds), so they never straddle "
                        "a split (0: exact bytes only; default: the spec's, else the source's: 10+crops for folders)")


def _storage_args(p: argparse.ArgumentParser, study_name: bool = False) -> None:
    p.add_argument("--results", default="results", type=Path, help="results directory (default: results/)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///RESULTS/pokestudy.db)")
    if study_name:
        p.add_argument("--study-name", help="name of the Optuna study (default: the spec's name)")


def _storage_url(args: argparse.Namespace) -> str:
    from pokestudy.api import storage_url

    return storage_url(args.storage, args.results)


def _run(args: argparse.Namespace) -> int:
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_study(args)
    finally:  # `main` called in-process (the tests) gets its own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_study(args: argparse.Namespace) -> int:
    from pokestudy import api
    from pokestudy.study import runner

    try:
        api.run(args.study, storage=args.storage, results=args.results, budget=args.budget,
                study_name=args.study_name, data=args.data, generator=f"pokestudy run --study {args.study}",
                evals=_evals(args.eval), near_duplicates=args.near_duplicates, address=args.address,
                max_concurrent=args.max_concurrent, gpus_per_trial=args.gpus_per_trial, restart=args.restart,
                verbose=args.verbose)
    except api.NothingFinished as e:
        print(f"pokestudy: {e}", file=sys.stderr)
        return 1
    except runner.BudgetSpent as e:  # a budget is a plan, not a failure: exit 0, and the rerun continues
        print(f"pokestudy: {e}", file=sys.stderr)
    return 0


def _api(function: str, *args: Any, **kwargs: Any) -> None:
    """A command that is one call of the Python API."""
    from pokestudy import api

    getattr(api, function)(*args, **kwargs)


def _duration(text: str) -> float:
    """Seconds in `90s`, `45m`, `2h` or `1h30m` (a bare number is seconds)."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 45m, 2h or 1h30m")
    h, m, sec = (float(g or 0) for g in match.groups())
    return 3600 * h + 60 * m + sec


_stopped_by = signal.SIGINT  # what ended the run, for its message and exit code (128 + the signal's number)


def _stop(signum: int, frame) -> None:
    """Ctrl-C and SIGTERM (what `timeout`, systemd and cluster schedulers send) stop a run alike: one
    line, and the rerun resumes. A Tune run ends between its steps; a second signal stops at once."""
    global _stopped_by
    _stopped_by = signal.Signals(signum)
    raytune = sys.modules.get("pokestudy.study.raytune")  # imported by `run` before Ray starts
    if raytune is not None:
        _exit_now_if_ray_died(wait=2.0)
        if raytune.stop_between_steps():
            return
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)  # a query cut short logs its cleanup: we are leaving
    raise KeyboardInterrupt


def _interrupted() -> int:
    """The one line an interrupted run ends with; returns its exit code."""
    how = "" if _stopped_by == signal.SIGINT else f" by {_stopped_by.name}"
    print(f"pokestudy: interrupted{how}; rerun the same command to continue", file=sys.stderr)
    return 128 + _stopped_by


def _report(args: argparse.Namespace) -> None:
    from pokestudy.report import build
    from pokestudy.study.store import check_writable

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = set(formats) - {"csv", "md", "tex", "json"}
    if bad or not formats:
        raise UserError(f"unknown format(s) {', '.join(sorted(bad)) or '(none)'}; use csv, md, tex, json")
    check_writable(args.results)
    build(_storage_url(args), args.study, args.results, formats, generator=f"pokestudy report --study {args.study}")


def _compare(args: argparse.Namespace) -> None:
    from pokestudy.report.compare import compare
    from pokestudy.study.store import check_writable

    check_writable(args.results)
    compare(_storage_url(args), args.first, args.second, args.results)


def _studies(args: argparse.Namespace) -> None:
    import optuna

    from pokestudy.study import spec
    from pokestudy.study.record import RecordError, StudyRecord, provenance_line
    from pokestudy.study.store import storage

    if args.available:
        shipped = spec.available()
        width = max(map(len, shipped)) + 2
        for name, text in shipped.items():
            print(f"{name:<{width}}{spec.parse(text, name).question}")
        return
    url = _storage_url(args)
    summaries = optuna.get_all_study_summaries(storage(url), include_best_trial=False)
    if not summaries:
        print(f"no studies in {url}; start one with `pokestudy run --study overfit`")
    width = max((len(s.study_name) for s in summaries), default=0) + 2
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=storage(url))
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        states = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"{s.study_name:<{width}}{s.n_trials:>4} trials  {states}")
        try:
            record = StudyRecord.from_study(study)
            print(f"{'':<{width}}{provenance_line(record.provenance)}")
            if ".tune." not in s.study_name:  # a tuning stage carries its study's spec, not its replicates
                print(f"{'':<{width}}{_replicates_line(record.study, study)}")
        except RecordError:
            print(f"{'':<{width}}(no pokestudy record: made by another tool or version)")


def _new(args: argparse.Namespace) -> None:
    """Write NAME.yaml from the commented template, checked by the spec loader; never over a file."""
    from importlib import resources

    from pokestudy.study import spec

    path = Path(f"{args.name}.yaml")
    text = (resources.files("pokestudy") / "new-study.yaml").read_text().replace("NAME", args.name)
    spec.parse(text, path.name)  # a bad name fails here, in the loader's words
    if path.exists():
        raise UserError(f"{path} exists; choose another name or remove it")
    path.write_text(text)
    print(f"wrote {path}: edit it, then `pokestudy run --study {path}`")


def _replicates_line(spec, study) -> str:
    """`replicates 3 done / 5 planned` (an adaptive study), or `replicates 2 done / 3`."""
    from pokestudy.study.runner import replicates_done

    if spec.adaptive:
        planned = study.user_attrs.get("replicates_planned")
        plan = f"{planned} planned" if planned else f"{spec.adaptive.min} (the pilot), then up to {spec.adaptive.max}"
    else:
        plan = str(len(spec.replicate_seeds()))
    return f"replicates {replicates_done(spec, study)} done / {plan}"


def _bench(args: argparse.Namespace) -> None:
    from pokestudy import bench

    result = bench.measure(args.data, args.res, args.arch, args.trials, args.precision)
    if args.json:
        print(json.dumps(result))
        return
    rows = [*((f"engine, {name} (img/s)", v) for name, v in result["layouts_images_per_s"].items()),
            ("reference loop (img/s)", result["reference_images_per_s"]),
            ("speedup", result["speedup"]), ("FLOP/s fraction of matmul", result["flops_fraction"]),
            ("study wall / ideal", result["study_overhead"]), ("study wall / plain loop", result["study_vs_loop"]),
            ("first epoch (s)", result["first_epoch_s"])]
    for name, value in rows:
        print(f"{name:<36}{value:>10.2f}")
    print(f"fastest layout, used for speedup and FLOP/s: {result['layout']}")
    print(f"engine precision {result['precision']} (native bf16: {'yes' if result['native_bf16'] else 'no'}), "
          f"against a {result['precision']} matmul roof; the reference loop runs fp32, as the report's did")


def _dashboard(args: argparse.Namespace) -> None:
    from optuna_dashboard import run_server

    from pokestudy.study.store import artifact_store, storage

    _check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"pokestudy: warning: the dashboard on {args.host} is reachable by others and has no login",
              file=sys.stderr)
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    run_server(storage(_storage_url(args)), host=args.host, port=args.port,
               artifact_store=artifact_store(args.results))


def _check_port(host: str, port: int) -> None:
    """Bind the dashboard's address once first: the server would print its banner, then a traceback."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # as bottle chooses
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot serve the dashboard on {host}:{port} ({reason}); pass --port N with a free port, "
                        "or stop what listens there") from None


def _exit_now_if_ray_died(wait: float = 0.0) -> None:
    """After SIGTERM to the whole process group (`timeout`, systemd) the local Ray is gone too: say so
    and exit at once, for stopping its trials or `ray.shutdown` at exit would wait a minute for it."""
    raytune = sys.modules.get("pokestudy.study.raytune")
    if raytune is not None and raytune.local_ray_died(wait):
        code = _interrupted()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"pokestudy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _exit_now_if_ray_died()
        return _interrupted()
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
