# The suite's time is mostly XLA compiling small programs; tests/conftest.py sets LLVM's -O0
# backend for the whole run (HLO passes, fusion and buffer assignment, which the memory and
# HLO checks read, are unchanged). Subprocesses that train or time something drop it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# The test processes see 8 host CPU devices, so that shard_map runs for real (tests/matrix.py).
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"


def runtime_env(env: dict) -> dict:
    """``env`` without :data:`FAST_COMPILE_FLAG` (for examples and benchmarks, whose time
    is spent running the programs rather than compiling them) and without
    :data:`DEVICE_COUNT_FLAG` (they choose their own devices)."""
    flags = env.get("XLA_FLAGS", "")
    for flag in (FAST_COMPILE_FLAG, DEVICE_COUNT_FLAG):
        flags = flags.replace(flag, "")
    flags = " ".join(flags.split())
    env = dict(env)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
