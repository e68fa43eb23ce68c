"""`asyncdiff-rt`: command-line entry point; each subcommand lives in commands/<name>.py.

Only the chosen subcommand's module is imported (they pull in torch and diffusers), so
`asyncdiff-rt --help` answers at once.
"""
import argparse
import importlib
import sys

# name -> one-line help for the top-level listing (each module registers its own parser).
COMMANDS = {
    "plan": "print units per component, balance, ideal speedup and bytes moved",
    "eval": "quality table (adherence, Frechet, PSNR vs sequential) on the shipped tiny model",
    "bench": "measure the local executor against sequential diffusers",
    "profile": "record a timeline of the local executor: Chrome trace, Gantt PNG, summary",
    "project": "project latency on D GPUs from measured forward times and a link model",
    "tune": "pick the fastest N, S, W, split, executor and transport within a quality bound",
}


class Refusal(SystemExit):
    """A request a subcommand cannot serve: `main` prints the one-line message and the
    process exits with status 2 (str() is the message, `code` is 2)."""

    def __init__(self, message):
        super().__init__(message)
        self.code = 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="asyncdiff-rt", description="Asynchronous denoising runtime")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, summary in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f"asyncdiff_rt.commands.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Refusal as refusal:
        print(f"asyncdiff-rt {args.command}: {refusal}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
