"""Settings every test (and every process a test starts) runs under.

The command line's persistent compilation cache stays off in tests (they must not write to the
user's cache folder, nor pass only because an earlier run compiled for them); the test of the
cache turns it on in a temporary folder.

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
"""

import os

import jaxlib.version
import pytest

os.environ["FEDJAX_LAB_COMPILE_CACHE"] = "off"
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# jaxlib 0.11 dropped the flag with the elemental emitters, and XLA aborts on a flag it does not
# know, so it is passed only to the jaxlib that has it. (XLA reads the flags when its first
# backend starts, not when jaxlib is imported.)
_OLD_EMITTERS = (["--xla_cpu_use_fusion_emitters=false"]
                 if jaxlib.version.__version_info__ < (0, 11) else [])
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_OLD_EMITTERS,
                                    "--xla_cpu_parallel_codegen_split_count=1"]).strip()


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_file():
    """Frees every compiled program when a test file ends. A worker otherwise holds thousands of
    them by the end of the suite (5.4 GB resident), and two runs of the whole suite crashed
    inside XLA's compiler late in a long-lived process (abort and segmentation fault, in tests
    that pass alone); files share almost no programs, so little is recompiled."""
    yield
    import jax

    jax.clear_caches()
