"""The `tunebench` command line (everything except `webui`, which webui/cli.py adds).

Each subcommand parses its arguments and calls one function in the module named
for the feature; heavy imports (torch, transformers) happen inside those calls so
`tunebench --help` stays instant. Exit codes: 0 success, 2 bad input (one line,
no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from . import config as cfg
from . import schema
from .errors import BadInput


BACKGROUND_HELP = ("run the {job} in the background as the page does (a job folder under "
                   "saves/): at once when the machine is free, else queued until it is; "
                   "prints the folder and returns")


def _train(args) -> int:
    if args.queue:
        from . import job_queue
        return job_queue.train_or_queue(*_config_and_overrides(args))
    from . import train
    return train.main(*_config_and_overrides(args))


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """`tunebench CMD CONFIG KEY=VALUE ...`, where CONFIG may be left out."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    return config, overrides


def _eval(args) -> int:
    from . import evaluate
    if args.queue:
        from . import job_queue, launch
        config = evaluate.resolve(*_config_and_overrides(args))
        evaluate.check(config)  # bad input now, not when the job's turn comes
        return job_queue.report_handed_off(launch.start_eval(config, "saves", queue=True))
    return evaluate.main(*_config_and_overrides(args))


def _chat(args) -> int:
    from . import chat
    settings = cfg.gen_config(schema.from_flags(args, cfg.GenConfig), source="the command line")
    return chat.terminal_chat(args.model, args.adapter, settings)


def _export(args) -> int:
    from . import export_job
    given = dict(schema.from_flags(args, cfg.ExportConfig), model=args.model,
                 adapter=args.adapter, out=args.out,
                 verify=False if args.no_verify else None,
                 overwrite=True if args.overwrite else None)
    if args.queue:
        from . import job_queue, launch
        job = export_job.job_from(args.config, given)
        return job_queue.report_handed_off(launch.start_export(job, "saves", queue=True))
    return export_job.main(args.config, given)


def _serve(args) -> int:
    from . import serve
    settings = cfg.serve_config(schema.from_flags(args, cfg.ServeConfig),
                                source="the command line")
    return serve.main(args.model, args.adapter, settings, api_key=args.api_key,
                      job_dir=args.job_dir)


def _demo_model(args) -> int:
    from . import demo_model
    path = demo_model.ensure_demo_model(args.out, force=args.force)
    print(path)
    return 0


def _data_check(args) -> int:
    from . import data
    return data.check_command(args.dataset, dataset_dir=args.dataset_dir, model=args.model,
                              template=args.template, stage=args.stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunebench", description="Fine-tune language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train in the foreground (what the Train tab starts)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each value is resolved in this order, each overriding the one before: "
                    "the schema default, the model's recommended settings "
                    f"({cfg.RECOMMENDED_FILE} beside its config.json), the YAML file, then "
                    "KEY=VALUE.",
        epilog=schema.help_text(cfg.TrainConfig, cfg.GROUPS))
    p.add_argument("config", nargs="?", help="config YAML (omit to use every default)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings on top of the file")
    p.add_argument("--queue", action="store_true",
                   help="when another job runs (or others wait), queue this run and return at "
                        "once instead of training now; a background runner starts it when the "
                        "devices are free (queue in saves/.queue/)")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "eval", help="evaluate a model and a checkpoint of it into a job folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes a job folder under saves/ (or output_dir) with results.json, and "
                    "predictions.jsonl for predict and probes. An eval of a run's checkpoint "
                    "takes the run's model, template and identity settings unless given.",
        epilog=schema.help_text(cfg.EvalConfig, ("eval", "model", "data", "generation", "run")))
    p.add_argument("config", nargs="?", help="eval config YAML (omit to use every default)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings on top of the file")
    p.add_argument("--queue", action="store_true", help=BACKGROUND_HELP.format(job="eval job"))
    p.set_defaults(func=_eval)

    p = sub.add_parser("chat", help="chat in the terminal, streaming the reply")
    p.add_argument("--model", required=True, help="model folder, hub id or 'demo'")
    p.add_argument("--adapter", help="LoRA adapter or checkpoint folder")
    schema.add_flags(p, cfg.GenConfig)
    p.set_defaults(func=_chat)

    p = sub.add_parser("export", help="write a merged model (safetensors, bitsandbytes or "
                       "GGUF) and verify it")
    p.add_argument("config", nargs="?", help="an export job's config.yaml (the Export tab "
                   "writes one into saves/exports/export-*/); flags override it")
    p.add_argument("--model", help="base model folder, hub id or 'demo' (required without "
                   "a config)")
    p.add_argument("--adapter")
    p.add_argument("--out", help="the export folder (required without a config)")
    schema.add_flags(p, cfg.ExportConfig)
    p.add_argument("--no-verify", action="store_true", help="skip the reload-and-compare check")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export in --out (never any other folder)")
    p.add_argument("--queue", action="store_true", help=BACKGROUND_HELP.format(job="export"))
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="serve a model and its LoRA adapters with an "
                       "OpenAI-compatible API")
    p.add_argument("--model", required=True, help="base model folder, hub id or 'demo'")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve this LoRA adapter as model id NAME (repeatable)")
    p.add_argument("--api-key", default=None, help=f"require this key (better: set "
                   f"{cfg.SERVE_KEY_ENV}, which stays out of `ps`)")
    p.add_argument("--job-dir", default=None, help=argparse.SUPPRESS)  # the page's job folder
    schema.add_flags(p, cfg.ServeConfig)
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo-model", help="build the embedded demo model and print its path")
    p.add_argument("--out", default=None, help="where to build it (default: the cache folder)")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.set_defaults(func=_demo_model)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("check", help="validate a dataset and show an example as trained")
    q.add_argument("dataset", help="registered name or file path")
    q.add_argument("--dataset-dir", default="data")
    q.add_argument("--model", default="demo", help="tokenizer to preview with")
    q.add_argument("--template", default="auto")
    q.add_argument("--stage", default="auto", choices=["auto", *cfg.STAGES],
                   help="check the file as training for this stage would read it "
                        "(auto: as its format suggests)")
    q.set_defaults(func=_data_check)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command, mapping errors to the exit codes in the spec."""
    try:
        return int(args.func(args) or 0)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
