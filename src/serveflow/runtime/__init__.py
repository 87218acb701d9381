"""Runtime layer: executes physical plans. `LocalRuntime` is the embedded one."""
