"""`asyncdiff-rt`: command-line entry point; each subcommand lives in commands/<name>.py."""
import argparse
import importlib
import sys

COMMANDS = ("plan", "eval", "bench")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="asyncdiff-rt", description="Asynchronous denoising runtime")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"asyncdiff_rt.commands.{name}").register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
