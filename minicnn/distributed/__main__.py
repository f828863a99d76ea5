"""``python -m minicnn.distributed selfcheck [...]``: see ``minicnn.distributed.selfcheck``."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "selfcheck":
        print("usage: python -m minicnn.distributed selfcheck [--device auto|cpu|cuda] "
              "[--dtype float32|float64] [--steps N] [--batch-size B]", file=sys.stderr)
        return 2
    from .selfcheck import main as selfcheck
    return selfcheck(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
