"""Settings every test (and every process a test starts) runs under.

JAX's persistent compilation cache is on, in a folder made for this run alone and removed when
it ends: the test processes, and the command lines and notebook kernels they start, share it. No
test writes to the user's cache folder or passes because an earlier run compiled for it, but a
program compiled twice in one run (the same primitive on the same shapes in two files, once the
first file's caches are freed; the same round built twice) is read back rather than compiled:
about a quarter of the suite's backend compile time (83 of 340 s), 36 s of its 851 s of test
time. The test of the command line's cache gives it a folder of its own.

XLA compiles without its expensive LLVM passes (`jax_disable_most_optimizations`: backend
optimisation level 0): the suite's programs are tiny, so compiling is nearly all of its time, and
this cuts about a third of it (tests/test_ditto.py: 150 s -> 93 s on two cores). The passes change
how fast the code runs, not what it computes; the tests' bit-for-bit comparisons compile both
sides under the same flags. Set in the environment before JAX is imported, so the subprocesses
and notebook kernels that tests start inherit it.

For the same reason XLA:CPU generates its fused kernels with the older elemental emitters
(`--xla_cpu_use_fusion_emitters=false`) in one piece (`--xla_cpu_parallel_codegen_split_count=1`):
jaxlib 0.10.2's newer fusion emitters compile each kernel through an extra MLIR pipeline, which
on two cores doubled the compile time of a tiny jitted function (25 against 46 ms), of the
registry's FedAvg, Ditto, FedMeta, pFedHN and FedGen rounds (4.9 against 12.5 s) and made
tests/test_fedamp.py plus tests/test_models.py take 134 s instead of 88.

Lowering a program to MLIR made a fresh MLIR context each time, loading every dialect into it:
about 2.2 of the 3.9 ms a small function took to lower, and 13,000 lowerings in a run (the eager
primitives are most of them). The tests share one context per thread for the length of a test file
instead (`_share_mlir_contexts`); the lowered modules are the same text (checked on every
registered algorithm's init and round), only the context they live in is reused. The default
suite on two cores went from 344-365 s (five runs) to 308-318 s (four, two on a clean clone).
"""

import atexit
import gc
import os
import shutil
import tempfile
import threading

import jaxlib.version
import pytest

if "FEDJAX_LAB_TEST_RUN_CACHE" not in os.environ:
    os.environ["FEDJAX_LAB_TEST_RUN_CACHE"] = tempfile.mkdtemp(prefix="fedjax_lab_tests_xla_")
    atexit.register(shutil.rmtree, os.environ["FEDJAX_LAB_TEST_RUN_CACHE"], ignore_errors=True)
os.environ["FEDJAX_LAB_COMPILE_CACHE"] = os.environ["FEDJAX_LAB_TEST_RUN_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FEDJAX_LAB_TEST_RUN_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# jaxlib 0.11 dropped the flag with the elemental emitters, and XLA aborts on a flag it does not
# know, so it is passed only to the jaxlib that has it. (XLA reads the flags when its first
# backend starts, not when jaxlib is imported.)
_OLD_EMITTERS = (["--xla_cpu_use_fusion_emitters=false"]
                 if jaxlib.version.__version_info__ < (0, 11) else [])
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_OLD_EMITTERS,
                                    "--xla_cpu_parallel_codegen_split_count=1"]).strip()

# Python's full garbage collections scan every object a worker holds (JAX's caches, every test
# module): 29 s of a run's 815 s of test time. They wait for the end of each file instead, where
# one collection follows the freeing of the file's programs, and skip what lives all session: the
# imported packages and the collected tests.
gc.set_threshold(*gc.get_threshold()[:2], 1000)


def pytest_collection_finish(session):
    _share_mlir_contexts()
    gc.collect()
    gc.freeze()


_mlir_contexts = threading.local()


def _share_mlir_contexts():
    """Makes JAX lower every program of a thread into one MLIR context, until the test file
    ends. `jax._src.interpreters.mlir.make_ir_context` is JAX's private factory; a JAX without it
    keeps lowering into fresh contexts."""
    try:
        from jax._src.interpreters import mlir
        make_fresh = mlir.make_ir_context
    except (ImportError, AttributeError):
        return

    def shared():
        if getattr(_mlir_contexts, "context", None) is None:
            _mlir_contexts.context = make_fresh()
        return _mlir_contexts.context

    mlir.make_ir_context = shared


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_file():
    """Frees every compiled program when a test file ends. A worker otherwise holds thousands of
    them by the end of the suite (5.4 GB resident), and two runs of the whole suite crashed
    inside XLA's compiler late in a long-lived process (abort and segmentation fault, in tests
    that pass alone). A program that a later file needs again is traced and lowered again, but
    read back from the run's compilation cache instead of compiled (34 s of backend compile)."""
    yield
    import jax

    jax.clear_caches()
    _mlir_contexts.context = None
    gc.collect()
