"""Command line: ``python -m minicnn doctor``."""
import argparse
import sys

from . import doctor

parser = argparse.ArgumentParser(prog="python -m minicnn")
parser.add_argument("command", choices=["doctor"],
                    help="doctor: report the Python, NumPy, CuPy, CUDA and GPU minicnn sees")
args = parser.parse_args()
sys.exit(doctor.main())
