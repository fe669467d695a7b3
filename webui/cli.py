"""Entry point of the `tunebench` console script.

It is core's command line plus the `webui` subcommand. It lives here, not in
core/, because core/ never imports webui/. Gradio is imported only when the
webui command runs, so `tunebench train` starts as fast as `python -m core`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from core import cli as core_cli
from core import i18n


def _webui(args) -> int:
    import os

    from core.paths import ENV_ROOTS, SAVES_ENV, confinement_env

    if args.saves_dir:
        os.environ[SAVES_ENV] = args.saves_dir
    if args.allow_root:
        extra = [str(Path(p).expanduser().resolve()) for p in args.allow_root]
        os.environ[ENV_ROOTS] = os.pathsep.join(
            [p for p in os.environ.get(ENV_ROOTS, "").split(os.pathsep) if p] + extra)
    # From here on, this server and every job it starts (trainer, preview, chat worker,
    # export) pass each path through the gate in core/paths.py.
    # The roots are written out absolute, so a job started in another working folder (the
    # chat worker runs from the package's folder) is confined to this server's folders.
    os.environ.update(confinement_env())
    from . import app
    return app.serve(host=args.host, port=args.port, auth=args.auth, share=args.share,
                     lang=args.lang)


def build_parser():
    parser = core_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # the subparsers action
    p = sub.add_parser("webui", help="serve the browser app")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--share", action="store_true", help="create a public Gradio link")
    p.add_argument("--saves-dir", default=None, help="where runs go (default: ./saves)")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="also allow the page to read and write under DIR (repeatable)")
    p.add_argument("--lang", default=None, choices=sorted(i18n.languages()),
                   help="the page's language for visitors who have not picked one "
                        "(default: each browser's own)")
    p.set_defaults(func=_webui)
    return parser


def main(argv: list[str] | None = None) -> int:
    return core_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
