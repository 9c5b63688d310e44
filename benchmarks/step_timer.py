"""Run a training script or module and record when each optimizer step finishes.

    python benchmarks/step_timer.py OUT.json -m personalize train cfg.yaml
    python benchmarks/step_timer.py OUT.json path/to/train_dreambooth_lora.py --flags ...

Both our trainer and the diffusers example scripts step through accelerate's
`AcceleratedOptimizer.step`, so one patch times both the same way, from outside their code.
On CPU each step's end is a wall-clock stamp. On CUDA a host stamp would only say when
the step was *queued*, so a CUDA event is recorded after each step instead (no sync) and
read at exit; the first step alone is synchronized, for an honest time to first step.
At exit OUT.json gets the stamps and the peak memory (RSS, and max_memory_allocated on CUDA).
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
import time

LAUNCHED = time.time()


def main() -> None:
    out, target = sys.argv[1], sys.argv[2:]
    if not target:
        raise SystemExit(__doc__)
    import torch
    from accelerate.optimizer import AcceleratedOptimizer

    cuda = torch.cuda.is_available()
    stamps: list[float] = []
    events: list = []
    original = AcceleratedOptimizer.step

    def timed_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.gradient_state.sync_gradients:  # a real step, not an accumulation micro-step
            if cuda:
                if not events:
                    torch.cuda.synchronize()
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append(event)
            stamps.append(time.time())
        return result

    AcceleratedOptimizer.step = timed_step

    def dump() -> None:
        data = {
            "launched": LAUNCHED,
            "stamps": stamps,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if cuda:
            torch.cuda.synchronize()
            data["gpu_seconds_since_first"] = [events[0].elapsed_time(e) / 1000 for e in events]
            data["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            data["device_name"] = torch.cuda.get_device_name()
        with open(out, "w", encoding="utf-8") as f:
            json.dump(data, f)

    atexit.register(dump)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path.insert(0, str(__import__("pathlib").Path(target[0]).resolve().parent))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
