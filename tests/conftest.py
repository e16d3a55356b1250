"""The command line's persistent compilation cache stays off in tests (they must not write to the
user's cache folder, nor pass only because an earlier run compiled for them); the test of the
cache turns it on in a temporary folder."""

import os

os.environ["FEDJAX_LAB_COMPILE_CACHE"] = "off"
