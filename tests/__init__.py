# The suite's time is mostly XLA compiling small programs; tests/conftest.py sets LLVM's -O0
# backend for the whole run (HLO passes, fusion and buffer assignment, which the memory and
# HLO checks read, are unchanged). Subprocesses that train or time something drop it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def runtime_env(env: dict) -> dict:
    """``env`` without :data:`FAST_COMPILE_FLAG` (for examples and benchmarks, whose time
    is spent running the programs rather than compiling them)."""
    flags = env.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAG, "").strip()
    env = dict(env)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
