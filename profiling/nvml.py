"""GPU telemetry through nvidia-ml-py (``pynvml``): a background sampler around the timed steps.

Every function here degrades to ``"n/a"`` fields (with a ``reason``) when ``pynvml`` is not installed, when
``nvmlInit`` raises (no driver: the CPU machines), when there is no CUDA device, or when a query is not supported;
none of them raises.

Per window: GPU name, driver, power limit; SM and memory clocks (mean, max), power (mean, max), utilisation of the
GPU and of its memory (mean of NVML's own sampled percentages), max temperature, clock-limit reasons seen; and
energy: the difference of NVML's total-energy counter across the window (mJ, Volta and newer), or when that is
not supported the time integral of the power samples. Energy per step = window energy / steps in the window.
"""

from __future__ import annotations

import threading
import time

NA = "n/a"

FIELDS = (
    "gpu_name", "driver", "power_limit_w", "sm_clock_mhz_mean", "sm_clock_mhz_max", "mem_clock_mhz_mean",
    "power_w_mean", "power_w_max", "energy_j", "energy_j_per_step", "energy_source", "util_gpu_pct_mean",
    "util_mem_pct_mean", "temperature_c_max", "clock_limits_seen", "samples",
)

# Clock-limit reasons worth naming in a report: pynvml constant suffix -> label. Newer pynvml calls them
# "ClocksEventReason", older "ClocksThrottleReason"; both are tried.
_LIMIT_REASONS = {
    "SwPowerCap": "sw power cap",
    "HwSlowdown": "hw slowdown",
    "SwThermalSlowdown": "sw thermal",
    "HwThermalSlowdown": "hw thermal",
    "HwPowerBrakeSlowdown": "power brake",
}


def unavailable(reason: str) -> dict:
    """Every telemetry field ``"n/a"``, and why."""
    return {**dict.fromkeys(FIELDS, NA), "reason": reason}


def _import():
    import pynvml  # noqa: PLC0415 - optional dependency, imported where used

    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle(nv, device_index: int):
    """The NVML handle of torch's CUDA device ``device_index`` (by UUID: CUDA_VISIBLE_DEVICES may renumber)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        return nv.nvmlDeviceGetHandleByUUID(uuid.encode())
    except Exception:  # noqa: BLE001 - fall back to the index
        return nv.nvmlDeviceGetHandleByIndex(device_index)


def status() -> tuple[bool, str]:
    """``(True, "")`` when NVML answers, else ``(False, why)``."""
    try:
        nv = _import()
    except Exception as exc:  # noqa: BLE001
        return False, f"nvidia-ml-py (pynvml) not importable: {exc}"
    try:
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return False, f"nvmlInit failed: {type(exc).__name__}: {exc}"
    try:
        nv.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass
    return True, ""


def device_facts(device_index: int = 0) -> dict:
    """Name, driver, power limit and max clocks of one GPU; ``"n/a"`` fields when NVML is unavailable."""
    facts = {"gpu_name": NA, "driver": NA, "power_limit_w": NA, "sm_clock_max_mhz": NA, "mem_clock_max_mhz": NA}
    try:
        nv = _import()
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return {**facts, "reason": f"NVML unavailable: {type(exc).__name__}: {exc}"}
    try:
        h = _handle(nv, device_index)
        queries = {
            "gpu_name": lambda: _text(nv.nvmlDeviceGetName(h)),
            "driver": lambda: _text(nv.nvmlSystemGetDriverVersion()),
            "power_limit_w": lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "sm_clock_max_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_max_mhz": lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM),
        }
        for key, query in queries.items():
            try:
                facts[key] = query()
            except Exception:  # noqa: BLE001 - one unsupported query leaves its field n/a
                pass
    except Exception as exc:  # noqa: BLE001
        facts["reason"] = f"NVML query failed: {type(exc).__name__}: {exc}"
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return facts


class Sampler:
    """Context manager: samples one GPU every ``interval_s`` on a background thread while active.

    ``with Sampler(0) as s: run(); summary = s.summary(steps)``. Without NVML it does nothing and
    :meth:`summary` returns :func:`unavailable`.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05, enabled: bool = True) -> None:
        self.device_index, self.interval_s = device_index, interval_s
        self.reason = "" if enabled else "telemetry not requested (no CUDA device)"
        self._nv = self._h = None
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0 = self._energy1 = None
        self._t0 = self._t1 = 0.0
        self._limit_bits: list[tuple[int, str]] = []

    def __enter__(self) -> Sampler:
        if self.reason:
            return self
        try:
            nv = _import()
            nv.nvmlInit()
        except Exception as exc:  # noqa: BLE001
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return self
        self._nv = nv
        try:
            self._h = _handle(nv, self.device_index)
        except Exception as exc:  # noqa: BLE001
            self.reason = f"no NVML handle for device {self.device_index}: {type(exc).__name__}: {exc}"
            self._shutdown()
            return self
        for suffix, label in _LIMIT_REASONS.items():
            for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
                if hasattr(nv, prefix + suffix):
                    self._limit_bits.append((getattr(nv, prefix + suffix), label))
                    break
        self._energy0 = self._energy()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._t1 = time.perf_counter()
            self._energy1 = self._energy()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def _energy(self):
        try:
            return self._nv.nvmlDeviceGetTotalEnergyConsumption(self._h)  # mJ since driver load
        except Exception:  # noqa: BLE001 - not supported before Volta
            return None

    def _sample(self) -> dict:
        nv, h, s = self._nv, self._h, {"t": time.perf_counter()}
        queries = {
            "sm_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000,
            "util": lambda: nv.nvmlDeviceGetUtilizationRates(h),
            "temp_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "limits": lambda: self._limit_query(h),
        }
        for key, query in queries.items():
            try:
                s[key] = query()
            except Exception:  # noqa: BLE001
                pass
        return s

    def _limit_query(self, h) -> int:
        nv = self._nv
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        return (fn or nv.nvmlDeviceGetCurrentClocksThrottleReasons)(h)

    def _loop(self) -> None:
        while True:
            self._samples.append(self._sample())
            if self._stop.wait(self.interval_s):
                break

    def summary(self, steps: int) -> dict:
        """The window's telemetry (see the module docstring); ``"n/a"`` where NVML or a query is unavailable."""
        if self.reason or not self._samples:
            return unavailable(self.reason or "no telemetry samples were taken")
        out = unavailable("")
        out.pop("reason")
        facts = device_facts(self.device_index)
        out.update({k: facts[k] for k in ("gpu_name", "driver", "power_limit_w")})
        out["samples"] = len(self._samples)

        def series(key, attr=None):
            vals = [s[key] for s in self._samples if key in s]
            return [getattr(v, attr) for v in vals] if attr else vals

        def put(name, vals, fn, ndigits=1):
            if vals:
                out[name] = round(fn(vals), ndigits)

        mean = lambda v: sum(v) / len(v)
        put("sm_clock_mhz_mean", series("sm_mhz"), mean, 0)
        put("sm_clock_mhz_max", series("sm_mhz"), max, 0)
        put("mem_clock_mhz_mean", series("mem_mhz"), mean, 0)
        put("power_w_mean", series("power_w"), mean)
        put("power_w_max", series("power_w"), max)
        put("util_gpu_pct_mean", series("util", "gpu"), mean)
        put("util_mem_pct_mean", series("util", "memory"), mean)
        put("temperature_c_max", series("temp_c"), max, 0)
        bits = 0
        for v in series("limits"):
            bits |= v
        if series("limits"):
            out["clock_limits_seen"] = ", ".join(label for bit, label in self._limit_bits if bits & bit) or "none"
        energy = None
        if self._energy0 is not None and self._energy1 is not None:
            energy, out["energy_source"] = (self._energy1 - self._energy0) / 1000, "energy counter"
        else:
            pts = [(s["t"], s["power_w"]) for s in self._samples if "power_w" in s]
            if len(pts) >= 2:
                # trapezoids over the samples, the edges of the window held at the nearest sample
                energy = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(pts, pts[1:]))
                energy += (pts[0][0] - self._t0) * pts[0][1] + (self._t1 - pts[-1][0]) * pts[-1][1]
                out["energy_source"] = "power samples (integral)"
        if energy is not None:
            out["energy_j"] = round(energy, 2)
            out["energy_j_per_step"] = round(energy / max(steps, 1), 3)
        return out
