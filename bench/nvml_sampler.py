"""``python -m bench.nvml_sampler UUID INTERVAL_S``: NVML used memory of the GPU with that UUID, sampled in
this process, and its energy (bench/energy.py: the counter, and the power sampled and integrated here).

Prints one JSON line when ready (the baseline reading, and which energy sources the GPU has). Then, for each line
``energy`` on stdin, one JSON line: the counter's joules and the integrated power's since this process started
(null where absent). Any other line (``stop``) or the end of stdin stops it: one JSON line with the peak, the
memory series and the power readings, with wall-clock stamps. Imports pynvml, not torch."""

from __future__ import annotations

import json
import sys
import time

from .energy import nvml_meter
from .sampler import Sampler, norm_uuid


def main(argv=None) -> int:
    uuid, interval = (argv or sys.argv[1:])[:2]
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = next(h for h in (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount()))
                      if norm_uuid(pynvml.nvmlDeviceGetUUID(h)) == norm_uuid(uuid))
    except Exception as e:  # no NVML, or no such GPU
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    s = Sampler(lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), float(interval))
    meter, reason = nvml_meter(pynvml, handle, idle_s=0)
    t0, perf0 = time.time(), time.perf_counter()
    s.start()
    if meter is not None:
        meter.start()
    print(json.dumps({"baseline": s.baseline, "energy_counter": bool(meter and meter.counter is not None),
                      "energy_power": bool(meter and meter.power is not None), "energy_reason": reason}), flush=True)
    for line in sys.stdin:
        if line.strip() != "energy":
            break
        print(json.dumps({"counter": meter.counter() if meter and meter.counter else None,
                          "power": meter.power() if meter and meter.power else None}), flush=True)
    s.stop()
    trace = []
    if meter is not None:
        meter.stop()
        trace = [(t0 + t - perf0, w) for t, w in meter.trace()]
    print(json.dumps({"peak": s.peak, "samples": [(t0 + t, v) for t, v in s.samples], "power": trace}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
