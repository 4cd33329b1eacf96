"""`python -m cascade_core ...`: route a question, fetch models, bench, train probes, report, serve.

The CLI is glue: it parses arguments, asks the composition layer (`cascade_core.compose`) for
folders, cascades and jobs, and prints what `cascade_core` computed. It imports nothing from
`models/`. Errors the user can fix are printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from cascade_core.locations import RESULTS_DOC, locations
from cascade_core.formatting import num
from cascade_core.presets import PresetError, list_presets, load_preset
from cascade_core.types import Question, Trace

FOLDER_HELP = "default: ${}, else {}"
DATASET_HELP = ("mmlu (default), a .jsonl/.csv/.parquet question file, or the name of a file dataset "
                "benchmarked before; records go to <results>/<name>/")
POLICY_DATASET_HELP = ("the questions' dataset (as bench --dataset names it): its questions' kind runs with its own "
                       "calibrated policy file and P(IK) probes when it has them, else the kind's policy (MMLU's, "
                       "arith's), else the preset's thresholds")
POLICY_FILE_HELP = "run with this policy file (calibrate wrote it), whatever --dataset and the question's kind say"


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback."""


def trace_table(trace: Trace, has_probe: dict[str, bool], formats: dict[str, str] | None = None) -> str:
    """Human-readable trace: one line per stage visited, then the answer and total cost.
    `formats`: stage -> its number format in words (`compose.formats.served_format_notes`)."""
    header = (f"{'stage':<22} {'answer':<8} {'P(T)':>6} {'P(IK)':>12} {'decision':<9} {'tokens':>7} {'FLOPs':>10} "
              f"{'sec':>7}")
    lines = [trace.thresholds] if trace.thresholds else []
    lines += [f"{name:<22} number format: {note}" for name, note in (formats or {}).items()]
    lines += [f"{name:<22} off: {why}" for name, why in trace.off.items()]
    lines += [header, "-" * len(header)]
    for s in trace.steps:
        if s.error:
            lines.append(f"{s.stage:<22} ERROR: {s.error}")
            continue
        pik = num(s.p_ik) if has_probe.get(s.stage) else "no probe yet"
        answer = (s.answer or "")[:8]
        lines.append(
            f"{s.stage:<22} {answer:<8} {num(s.p_t):>6} {pik:>12} {s.decision:<9} "
            f"{s.prompt_tokens + s.output_tokens:>7} {s.flops:>10.3g} {s.seconds:>7.2f}"
        )
        if s.reason and s.decision != "final":
            lines.append(f"{'':<22} why: {s.reason}")
    final = trace.answered_by
    lines.append("")
    if final is None:
        lines.append("no stage answered")
    else:
        lines.append(f"answer: {trace.answer_text()}   (by {final.stage})")
    lines.append(
        f"total: {trace.total('flops'):.3g} FLOPs, "
        f"{int(trace.total('prompt_tokens') + trace.total('output_tokens'))} tokens, "
        f"${trace.total('dollars'):.6f}, {trace.total('seconds'):.2f} s"
    )
    return "\n".join(lines)


def cmd_route(args: argparse.Namespace) -> int:
    from cascade_core.cascade import CascadeError, run_cascade, trace_to_dict
    from cascade_core.compose.formats import served_format_notes
    from cascade_core.compose.live import build_cascade
    from cascade_core.prompts import validate_question
    from cascade_core.server.options import check_route_args, resolve_policies

    check_route_args(args)  # before any model loads
    question = Question(text=args.question, options=tuple(args.options or ()), subject=args.subject or "")
    validate_question(question)
    preset = load_preset(args.preset)
    policies = resolve_policies(preset, args, question.is_multiple_choice)  # --dataset, --policy: no model yet
    stages = build_cascade(preset, only=args.stages, progress=not args.json, thresholds=args.thresholds,
                           policies=policies)
    formats = served_format_notes(f"cascade-{preset.name}", stages)
    policy = policies[question.is_multiple_choice]

    def on_event(event, stage, step):
        if not args.json and event == "start":
            print(f"... {stage.name}", file=sys.stderr, flush=True)

    try:
        trace = run_cascade(stages, question, on_event=on_event, max_new_tokens=args.max_new_tokens)
    except CascadeError as err:
        trace = err.trace
        if args.json:
            print(json.dumps({**trace_to_dict(trace), "number_format": formats, "policy": policy.to_dict()}))
        else:
            print(policy.line() + "\n" + trace_table(trace, {s.name: s.probe is not None for s in stages}, formats))
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**trace_to_dict(trace), "number_format": formats, "policy": policy.to_dict()}))
    else:
        print(policy.line() + "\n" + trace_table(trace, {s.name: s.probe is not None for s in stages}, formats))
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from cascade_core.compose.live import fetch_preset_models

    preset = load_preset(args.preset)
    for name, path in fetch_preset_models(preset, include_extra=args.all):
        print(f"{name}: {path}")
    return 0


def _dataset_name(spec: str, results_dir) -> str:
    """The folder name of a `--dataset` value (`dataset_registry.dataset_name`): `mmlu` as it was."""
    if spec == "mmlu":
        return spec
    from cascade_core.records.registry import dataset_name

    return dataset_name(spec, results_dir)


def _shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N), for argparse (which turns the ValueError into a usage message)."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(index), int(count)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cascade_core.compose.jobs import bench_configs, bench_questions, bench_stage, shard_of

    if args.shard and not args.backfill_features:
        raise UsageError("--shard splits a --backfill-features run (each shard only adds feature files); a "
                         "stage's records are one file, so two record runs of one stage cannot share it")
    check_bench_format(load_preset(args.preset), args)
    if args.format_check:
        return 0
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    where = locations(args.results_dir, args.features_dir)
    dataset = _dataset_name(args.dataset, where.results)
    questions = bench_questions(args.dataset, split=args.split, per_subject=args.per_subject,
                                results_dir=where.results)
    if args.shard:
        questions = shard_of(questions, *args.shard)
    for config in bench_configs(preset, args.stages):
        if config.backend == "recorded":
            print(f"{config.name}: recorded stage, nothing to run")
            continue
        bars: list = []

        def progress(done: int, total: int, bars=bars, name=config.name) -> None:
            # The bar starts at what is already done, so its rate and ETA count this run's work only.
            if not bars:
                bars.append(tqdm(total=total, initial=done, desc=name, unit="q", disable=args.quiet,
                                 smoothing=0.05))
            bars[0].update(done - bars[0].n)

        result = bench_stage(config, questions, where, dataset, batch_size=args.batch_size,
                             progress=progress, backfill=args.backfill_features,
                             max_new_tokens=args.max_new_tokens)
        for bar in bars:
            bar.close()
        if args.backfill_features:
            print(f"{config.name}: features for {result['questions']} recorded questions "
                  f"({result['backfilled']} computed now, {result['agree']} of them agree with the "
                  f"recorded prediction) -> {where.features_dir(config.name, dataset)}")
        else:
            from cascade_core.records.schema import labelled_rows

            labelled = labelled_rows(result)
            accuracy = (f"accuracy {result['correct'][labelled].mean():.3f}" if labelled.any()
                        else "no answers (calibrate label-free)")
            print(f"{config.name}: {len(result)} records, {accuracy} -> {where.record_path(config.name, dataset)}")
        del result
    return 0


def check_bench_format(preset, args: argparse.Namespace) -> None:
    """Refuse to benchmark in emulated bfloat16 (a stage resolving to bfloat16 on a CPU without it),
    several times slower than float32 (docs/BENCHMARKS.md, "Float32 against bfloat16 on a CPU without
    native bfloat16"), unless forced (--allow-emulated-bf16 or $CASCADE_ALLOW_EMULATED_BF16=1)."""
    import os

    from cascade_core.compose.formats import emulated_stages
    from cascade_core.compose.jobs import bench_configs
    from cascade_core.number_format import ALLOW_EMULATED_ENV, emulated_bf16_refusal

    emulated = emulated_stages([c for c in bench_configs(preset, args.stages) if c.backend != "recorded"])
    if not emulated:
        return
    if args.allow_emulated_bf16 or os.environ.get(ALLOW_EMULATED_ENV, "").strip() == "1":
        print(f"warning: {', '.join(emulated)} run in emulated bfloat16 (forced): expect 5-7x the float32 time",
              file=sys.stderr)
        return
    raise UsageError(emulated_bf16_refusal(emulated))


def cmd_probes_train(args: argparse.Namespace) -> int:
    from cascade_core.compose.jobs import train_probes

    preset = load_preset(args.preset)
    where = locations(args.results_dir, args.features_dir, args.probes_dir)
    dataset = _dataset_name(args.dataset, where.results)
    for outcome in train_probes(preset, where, dataset, stages=args.stages, seed=args.seed):
        print(f"{outcome.stage}: {outcome.message}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cascade_core.report import build_report
    from cascade_core.report.markdown import render
    from cascade_core.compose.tables import load_report_inputs

    dataset = _dataset_name(args.dataset, locations(args.results_dir).results)
    from cascade_core.records.registry import read_metadata

    if read_metadata(dataset, locations(args.results_dir).results).get("kind") == "free":
        return _report_free_form(args, dataset)
    inputs = load_report_inputs(args.preset, dataset, args.results_dir, args.features_dir)
    for stage, why in inputs["meta"]["features_missing"].items():
        print(f"{stage}: no OOD / label-free probes ({why})", file=sys.stderr)
    say = (lambda message: None) if args.quiet else (lambda message: print(f"... {message}", file=sys.stderr,
                                                                           flush=True))
    report = build_report(inputs["table"], questions=inputs["questions"], features=inputs["features"],
                          meta=inputs["meta"], progress=say)
    default = (str(RESULTS_DOC) if dataset == "mmlu"
               else str(locations(args.results_dir).results / dataset / "REPORT.md"))
    return _write_report(args, default, render(report), report)


def _write_report(args: argparse.Namespace, default_out: str, text: str, report: dict) -> int:
    """`--out` (default `default_out`; '' writes no file) gets the Markdown, `--json` the figures."""
    from cascade_core.io import atomic_write_text

    out = default_out if args.out is None else args.out
    if out:
        atomic_write_text(Path(out), text)
        print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, allow_nan=False))
    return 0


def _report_free_form(args: argparse.Namespace, dataset: str) -> int:
    """`report` of a free-form dataset (`report.freeform`): a shipped set's goes to
    docs/RESULTS-<name>.md, a user's file's beside its records."""
    from cascade_core.records.runner import load_records
    from cascade_core.compose.tables import load_preset_table
    from cascade_core.records.registry import BUILTIN
    from cascade_core.report.freeform import freeform_report, render_freeform

    from cascade_core.compose.tables import MissingRecordsError

    where = locations(args.results_dir)
    default = (str(RESULTS_DOC.with_name(f"RESULTS-{dataset}.md")) if dataset in BUILTIN
               else str(where.results / dataset / "REPORT.md"))
    try:
        table = load_preset_table(args.preset, dataset, args.results_dir, include_recorded=False)
    except MissingRecordsError as err:  # not benchmarked (yet): a report that says so, not a traceback
        from cascade_core.report.freeform import no_records_report

        print(f"{dataset}: no records yet ({err}); the report says so", file=sys.stderr)
        report = no_records_report(dataset, str(err))
        return _write_report(args, default, render_freeform(report), report)
    frames = {name: load_records(where.record_path(name, dataset)) for name in table.names}
    if not args.quiet:
        print(f"... free-form report of {dataset}: {table.n_questions} questions, {args.resplits} re-splits",
              file=sys.stderr, flush=True)
    report = freeform_report(table, frames, dataset, resplits=args.resplits)
    return _write_report(args, default, render_freeform(report), report)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cascade_core.locations import locations
    from cascade_core.compose.policies import calibrate, stage_summary

    if args.budget is not None and args.target is not None:
        raise UsageError("give --target or --budget, not both")
    if not 0 < args.delta < 1:
        raise UsageError(f"--delta must be between 0 and 1, got {args.delta}")
    if args.from_traces:
        return _calibrate_from_traces(args)
    where = locations(results_dir=args.results_dir, policies_dir=args.policies_dir)
    target = None if args.budget is not None else (1.0 if args.target is None else args.target)
    dataset = _dataset_name(args.dataset, where.results)
    path, found = calibrate(load_preset(args.preset), where, dataset, target_pt=target, delta=args.delta,
                            budget=args.budget, unit=args.unit, rule=args.rule, seed=args.seed,
                            letter_bias=args.letter_bias, label_free=args.label_free)
    figures = found.calibration
    print(f"{found.description} -> {path}")
    policy = found.cascade_policy()
    for i, (name, stage) in enumerate(zip(found.stages, policy.stages)):
        print(f"  {name:<22} {stage_summary(stage, i == policy.last_enabled, found.off_reasons.get(name, ''))}")
    if found.guarantee.get("loss") == "label_free":
        labelled = (f"accuracy {figures['accuracy']:.4f} (last stage alone {figures['reference_accuracy']:.4f})"
                    if figures.get("accuracy") is not None else "no answers to measure accuracy")
        print(f"  label-free: the guarantee bounds the disagreement with {found.stages[-1]}'s answers, so it holds "
              "for any labels")
        print(f"  rule {found.guarantee['rule']}; on calibration: agreement with the last stage "
              f"{figures['agreement']:.4f}, {labelled}, {figures['unit']} saved {figures['cost_reduction']:.1%}")
        return 0
    print(f"  rule {found.guarantee['rule']}; on calibration: accuracy {figures['accuracy']:.4f} "
          f"(last stage alone {figures['reference_accuracy']:.4f}), {figures['unit']} saved "
          f"{figures['cost_reduction']:.1%}")
    return 0


def _calibrate_from_traces(args: argparse.Namespace) -> int:
    """`calibrate --from-traces DB`: a label-free policy from the audited traffic (`monitor.from_traces`)."""
    from cascade_core.monitor.from_traces import calibrate_from_traces

    if args.budget is not None:
        raise UsageError("--from-traces certifies a loss target (label-free), not a --budget")
    path, found = calibrate_from_traces(args.from_traces, args.preset, kind=args.traces_kind,
                                        target_pt=1.0 if args.target is None else args.target, delta=args.delta,
                                        rule=args.rule, seed=args.seed, out=args.out)
    print(f"{found.description} -> {path}")
    print(f"  label-free: the guarantee bounds the disagreement with {found.stages[-1]}'s answers on "
          f"{found.provenance['questions']:,} audited questions of {args.from_traces}, so it holds for any labels")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """`monitor DB`: the trace database's status, drift and alarms (`monitor.view`), once or every --watch s."""
    import time

    from cascade_core.monitor.view import render_text, summarise

    while True:
        summary = summarise(args.db)
        print(json.dumps(summary, allow_nan=False) if args.json else render_text(summary), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)
        print()


def cmd_presets(args: argparse.Namespace) -> int:
    if args.stages:  # for scripts: the preset's enabled stages that a benchmark runs, one a line
        for config in load_preset(args.stages).stages:
            if config.enabled and config.backend != "recorded":
                print(config.name)
        return 0
    for name in list_presets():
        preset = load_preset(name)
        stages = " -> ".join(s.name for s in preset.stages)
        print(f"{name:<14} {stages}{'   (needs network)' if preset.needs_network else ''}")
        for extra in preset.extra_stages:  # may be added to the cascade (Settings page, a copy of the file)
            print(f"{'':<14} extra stage {extra.name}: {extra.display_name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The cascade (or, with --single-stage, one packaged model) behind the OpenAI API."""
    from cascade_core.server.options import check_serve_args
    from cascade_core.server.run import serve_app

    check_serve_args(args)  # every flag that needs no model, before any model loads
    if getattr(args, "traces", None):
        from cascade_core.monitor.setup import check_monitor_args

        check_monitor_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.single_stage:
        from cascade_core.compose.live import single_stage_backend
        from cascade_core.server.single_stage import create_single_stage_app

        backend = single_stage_backend(args.single_stage, device=args.device)
        app = create_single_stage_app(backend, args.single_stage, api_key_env=args.token_env,
                                      max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                                      max_in_flight=args.max_in_flight, max_waiting=args.max_queue,
                                      timeout_s=args.timeout_s)
        served = [args.single_stage]
    else:
        from cascade_core.compose.live import build_cascade
        from cascade_core.server.cascade_app import create_cascade_app

        preset = load_preset(args.preset)
        recorded = [c.name for c in preset.stages if c.enabled and c.backend == "recorded"
                    and (not args.stages or c.name in args.stages)]
        if recorded:
            raise UsageError(f"preset {preset.name!r}: {', '.join(recorded)} replay recorded MMLU outcomes and cannot "
                             "answer live questions; serve the other stages with --stages NAME ...")
        from cascade_core.server.options import resolve_policies

        policies = resolve_policies(preset, args)  # --dataset, --policy: before any model loads
        stages = build_cascade(preset, only=args.stages, progress=False, thresholds=args.thresholds, policies=policies)
        print(stages[0].policy_source, file=sys.stderr, flush=True)
        for chosen in policies.values():
            print(chosen.line(), file=sys.stderr, flush=True)
        monitor = None
        if args.traces:
            from cascade_core.monitor.setup import build_monitor

            monitor = build_monitor(preset, stages, args.traces, thresholds=args.thresholds,
                                    retention_days=args.retention_days, max_rows=args.max_traces,
                                    store_questions=args.store_questions, audit_share=args.audit_share,
                                    seed=args.audit_seed, alpha=args.drift_alpha, fallback=args.fallback_on_broken,
                                    policies=policies)
            print(f"traces -> {args.traces} (audit share {args.audit_share:g})", file=sys.stderr, flush=True)
        app = create_cascade_app({preset.name: stages}, api_key_env=args.token_env,
                                 max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                                 max_in_flight=args.max_in_flight, max_waiting=args.max_queue,
                                 timeout_s=args.timeout_s, default_max_new_tokens=args.max_new_tokens,
                                 monitor=monitor, policies={preset.name: {kind: policies[mc].to_dict() for kind, mc in
                                                                         (("multiple_choice", True),
                                                                          ("free_form", False))}})
        served = list(app.state.served)
    print(f"serving {', '.join(served)} on http://{args.host}:{args.port}/v1"
          f"{' (bearer token required)' if args.token_env else ''}", file=sys.stderr, flush=True)
    serve_app(app, args.host, args.port, args.log_level, grace_s=args.grace_s, header_timeout_s=args.header_timeout_s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cascade_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    route = sub.add_parser("route", help="route one question through a cascade and print the trace")
    route.add_argument("question")
    route.add_argument("--options", nargs="+", metavar="OPTION", help="answer options (2-26); none = free-form")
    route.add_argument("--subject", default="", help="subject for the prompt header, e.g. anatomy")
    route.add_argument("--preset", default="default", help="preset name or TOML path (default: default)")
    route.add_argument("--stages", nargs="+", metavar="NAME", help="use only these stages of the preset")
    route.add_argument("--max-new-tokens", type=int, default=64, help="for free-form answers")
    route.add_argument("--json", action="store_true", help="print the trace as JSON")
    route.add_argument("--thresholds", choices=["auto", "calibrated", "preset"], default="auto",
                       help="auto (default): the calibrated policy file when there is one, else the preset's; "
                            "preset: the thresholds written in the preset")
    route.add_argument("--dataset", default=None, metavar="NAME", help=POLICY_DATASET_HELP)
    route.add_argument("--policy", default=None, metavar="FILE", help=POLICY_FILE_HELP)
    route.set_defaults(func=cmd_route)

    models = sub.add_parser("models", help="manage the models of a preset")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="fetch and prepare a preset's models (skips what is there)")
    fetch.add_argument("--preset", default="default")
    fetch.add_argument("--all", action="store_true", help="also the preset's extra stages")
    fetch.set_defaults(func=cmd_models_fetch)

    bench = sub.add_parser("bench", help="run every stage over a dataset and cache per-question records")
    bench.add_argument("--preset", default="default")
    bench.add_argument("--dataset", default="mmlu", help=DATASET_HELP)
    bench.add_argument("--per-subject", type=int, default=None, metavar="N",
                       help="N questions per subject, half calibration, half test (default: all)")
    bench.add_argument("--split", choices=["all", "calibration", "test"], default="all")
    bench.add_argument("--stages", nargs="+", metavar="NAME", help="only these stages")
    bench.add_argument("--batch-size", type=int, default=None)
    bench.add_argument("--results-dir", default=None, help=FOLDER_HELP.format("CASCADE_RESULTS_DIR", "data/results"))
    bench.add_argument("--features-dir", default=None, help=FOLDER_HELP.format("CASCADE_FEATURES_DIR", "data/features"))
    bench.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch (default: torch's choice; 1 is fastest when other work shares the "
                            "cores)")
    bench.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                       help="free-form datasets: the longest answer generated (default 16)")
    bench.add_argument("--backfill-features", action="store_true",
                       help="only compute hidden-state features for questions that have records but none")
    bench.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                       help="with --backfill-features: only every N-th question from the K-th (0-based), so N "
                            "workers or machines share one backfill (run K = 0 .. N-1)")
    bench.add_argument("--allow-emulated-bf16", action="store_true",
                       help="run even where a stage would compute in bfloat16 on a CPU without native bfloat16 "
                            "(refused by default: 5-7x slower than float32; or $CASCADE_ALLOW_EMULATED_BF16=1)")
    bench.add_argument("--format-check", action="store_true",
                       help="only check the stages' number format (the emulated-bfloat16 refusal), run nothing")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)

    probes = sub.add_parser("probes", help="P(IK) probes")
    probes_sub = probes.add_subparsers(dest="probes_command", required=True)
    train = probes_sub.add_parser("train", help="train one probe per model on the calibration split")
    train.add_argument("--preset", default="default")
    train.add_argument("--dataset", default="mmlu", help=DATASET_HELP)
    train.add_argument("--stages", nargs="+", metavar="NAME")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--results-dir", default=None, help=FOLDER_HELP.format("CASCADE_RESULTS_DIR", "data/results"))
    train.add_argument("--features-dir", default=None, help=FOLDER_HELP.format("CASCADE_FEATURES_DIR", "data/features"))
    train.add_argument("--probes-dir", default=None, help="for stages whose preset names no probe file; "
                       + FOLDER_HELP.format("CASCADE_PROBES_DIR", "data/probes"))
    train.set_defaults(func=cmd_probes_train)

    report = sub.add_parser("report", help="the paper's experiment on the records -> docs/RESULTS.md")
    report.add_argument("--preset", default="default")
    report.add_argument("--dataset", default="mmlu", help=DATASET_HELP)
    report.add_argument("--json", action="store_true", help="also print every number as JSON")
    report.add_argument("--out", default=None, help="default: docs/RESULTS.md for mmlu, else "
                        "<results>/<dataset>/REPORT.md; '' to skip the file")
    report.add_argument("--results-dir", default=None, help=FOLDER_HELP.format("CASCADE_RESULTS_DIR", "data/results"))
    report.add_argument("--features-dir", default=None, help=FOLDER_HELP.format("CASCADE_FEATURES_DIR",
                                                                                "data/features"))
    report.add_argument("--resplits", type=int, default=200,
                        help="free-form datasets: re-splits of the guarantee study")
    report.add_argument("--quiet", action="store_true")
    report.set_defaults(func=cmd_report)

    serve = sub.add_parser("serve", help="serve the cascade (or one model) behind the OpenAI API; see docs/SERVING.md")
    serve.add_argument("--preset", default="default", help="preset name or TOML path (default: default)")
    serve.add_argument("--stages", nargs="+", metavar="NAME", help="serve only these stages of the preset")
    serve.add_argument("--single-stage", metavar="MODEL",
                       help="serve one packaged model (e.g. smollm2-135m) as a plain endpoint with logprobs")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--allow-remote", action="store_true", help="allow a --host that other machines can reach")
    serve.add_argument("--token-env", metavar="NAME",
                       help="NAME of an environment variable holding the bearer token clients must send")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="413 above (default 1000000)")
    serve.add_argument("--max-prompt-chars", type=int, default=32_000, help="400 above (default 32000)")
    serve.add_argument("--max-in-flight", type=int, default=4, help="requests running per model (default 4)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting per model; 429 beyond (default 64)")
    serve.add_argument("--timeout-s", type=float, default=120.0, help="per-request limit; 504 after (default 120)")
    serve.add_argument("--max-new-tokens", type=int, default=64, help="free-form answers, unless the request says")
    serve.add_argument("--grace-s", type=float, default=10.0,
                       help="on SIGTERM: seconds running requests may finish before they are cancelled (default 10)")
    serve.add_argument("--header-timeout-s", type=float, default=10.0,
                       help="a connection must send its request headers within this (default 10)")
    serve.add_argument("--thresholds", choices=["auto", "calibrated", "preset"], default="auto",
                       help="auto (default): the preset's calibrated policy file when there is one, "
                            "else its thresholds")
    serve.add_argument("--dataset", default=None, metavar="NAME", help=POLICY_DATASET_HELP)
    serve.add_argument("--policy", default=None, metavar="FILE", help=POLICY_FILE_HELP)
    serve.add_argument("--device", default="auto", help="--single-stage only (presets name their own devices)")
    serve.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--traces", metavar="DB", default=None,
                       help="store every trace in this SQLite file and monitor the policy (README: Monitoring)")
    serve.add_argument("--retention-days", type=float, default=None, help="--traces: delete traces older than this")
    serve.add_argument("--max-traces", type=int, default=None, help="--traces: keep at most this many (newest)")
    serve.add_argument("--store-questions", action="store_true",
                       help="--traces: also store question and answer texts (credential-shaped strings masked)")
    serve.add_argument("--audit-share", type=float, default=0.02,
                       help="--traces: share of questions audited by the skipped stages (default 0.02)")
    serve.add_argument("--audit-seed", type=int, default=0, help="--traces: seed of the audit coin")
    serve.add_argument("--drift-alpha", type=float, default=None,
                       help="--traces: drift alarm level (default 1e-4: >= 10,000 questions between false alarms on "
                            "average)")
    serve.add_argument("--fallback-on-broken", action="store_true",
                       help="--traces: when re-certification says broken, answer with the last stage alone until "
                            "re-calibrated (said in every trace)")
    serve.set_defaults(func=cmd_serve)

    cal = sub.add_parser("calibrate",
                         help="choose thresholds with a guarantee on the calibration split -> a policy file")
    cal.add_argument("--preset", default="default")
    cal.add_argument("--dataset", default="mmlu", help=DATASET_HELP)
    cal.add_argument("--target", type=float, default=None, metavar="PT",
                     help="accuracy points the cascade may lose against its last stage (default 1)")
    cal.add_argument("--delta", type=float, default=0.1, help="risk: the target holds with probability >= 1 - delta")
    cal.add_argument("--budget", type=float, default=None, help="instead of --target: mean cost per question")
    cal.add_argument("--unit", choices=["flops", "tokens", "dollars", "seconds", "calls"], default=None,
                     help="cost unit (default: dollars with a priced stage, else flops)")
    cal.add_argument("--rule", default="auto",
                     help="keep score of the early stages: auto (default: chosen by cross-validation inside "
                          "calibration), pt_only, both, learned or loss_aware")
    cal.add_argument("--letter-bias", action="store_true",
                     help="debias the early stages' option letters (fit on calibration) before choosing")
    cal.add_argument("--label-free", dest="label_free", action="store_true", default=None,
                     help="certify the disagreement with the last stage's answers: the target then holds for any "
                          "labels (automatic when the dataset has no answers; the last stage must not be recorded)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--results-dir", default=None)
    cal.add_argument("--policies-dir", default=None)
    cal.add_argument("--from-traces", metavar="DB", default=None,
                     help="calibrate label-free on the audited questions of a trace database (serve --traces DB)")
    cal.add_argument("--traces-kind", choices=["free", "mc"], default="free",
                     help="--from-traces: the free-form (default) or the multiple-choice policy's traffic")
    cal.add_argument("--out", default=None, help="--from-traces: the policy file to write (default: the preset's)")
    cal.set_defaults(func=cmd_calibrate)

    mon = sub.add_parser("monitor", help="a trace database's re-certification, drift alarm and costs (serve --traces)")
    mon.add_argument("db", help="the SQLite file serve --traces wrote")
    mon.add_argument("--json", action="store_true", help="print everything as one JSON object")
    mon.add_argument("--watch", type=float, default=0, metavar="S", help="print again every S seconds")
    mon.set_defaults(func=cmd_monitor)

    from cascade_core.server.vllm_launch import add_parser as add_vllm_parser

    add_vllm_parser(sub)  # vllm up | down | status

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.add_argument("--stages", metavar="PRESET", help="print this preset's benchmarked stages, one a line")
    presets.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (PresetError, UsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
