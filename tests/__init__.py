# The suite's time is mostly XLA compiling small programs; tests/conftest.py sets LLVM's -O0
# backend for the whole run (HLO passes, fusion and buffer assignment, which the memory and
# HLO checks read, are unchanged). The examples' smoke tests keep it too: a few steps each,
# so compiling is most of their time (the GAN's: 18.0 -> 13.9 CPU-s).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# The test processes see 8 host CPU devices, so that shard_map runs for real (tests/matrix.py).
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"


def example_env(env: dict) -> dict:
    """``env`` without :data:`DEVICE_COUNT_FLAG`, for the examples, which choose their own
    devices."""
    flags = env.get("XLA_FLAGS", "").replace(DEVICE_COUNT_FLAG, "")
    flags = " ".join(flags.split())
    env = dict(env)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
