"""Command line: ``python -m minicnn doctor`` and ``python -m minicnn selftest``."""
import argparse
import sys

from . import selftest


def main(argv=None):
    """Parse ``argv`` (default: the command line) and run the command -> exit status."""
    parser = argparse.ArgumentParser(prog="python -m minicnn")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("doctor", help="report the Python, NumPy, CuPy, CUDA and GPU minicnn sees")
    checks = commands.add_parser(
        "selftest", help="check every kernel and layer against its reference (CPU against GPU "
                         "where there is one) and write report.json and report.md",
        description=selftest.DESCRIPTION)
    selftest.add_arguments(checks)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from . import doctor
        return doctor.main()
    return selftest.run(args)


if __name__ == "__main__":
    sys.exit(main())
