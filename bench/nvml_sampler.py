"""``python -m bench.nvml_sampler UUID INTERVAL_S``: NVML used memory of the GPU with that UUID, sampled in
this process until a line arrives on stdin. Prints one JSON line when ready (with the baseline reading)
and one when stopped (peak and the series with wall-clock stamps). Imports pynvml, not torch."""

from __future__ import annotations

import json
import sys
import time

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
    t0 = time.time()
    s.start()
    print(json.dumps({"baseline": s.baseline}), flush=True)
    sys.stdin.readline()
    s.stop()
    print(json.dumps({"peak": s.peak, "samples": [(t0 + t, v) for t, v in s.samples]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
