"""GPUs and their memory: NVIDIA (NVML or nvidia-smi), AMD (sysfs), Apple Silicon, Jetson.

Apple Silicon and Jetson share system RAM with the GPU (``unified_memory``); their "VRAM"
is the RAM the CPU also counts, so the selector must not add the two.

``read_*`` do I/O and return raw text (None when absent); ``parse_*`` are pure. Live
tools (NVML, nvidia-smi) run only against the live root; a fake root supplies
their captured output as files under ``<root>/.captured/`` instead. Nothing here
initialises a CUDA context or allocates GPU memory.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess

from agent.hardware.device import GPUInfo
from agent.hardware.sysfs import is_live, read_first_line, read_text, under
from agent.log import get_logger

log = get_logger(__name__)

NVIDIA_SMI_FIELDS = (
    "index",
    "name",
    "memory.total",
    "memory.free",
    "driver_version",
    "compute_cap",
)
NVIDIA_SMI_ARGS = (
    f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}",
    "--format=csv,noheader,nounits",
)
TOOL_TIMEOUT_S = 5.0
MIB = 1024 * 1024

# Jetson SoCs by device-tree compatible, with their CUDA compute capability.
_TEGRA_SOCS = {
    "tegra234": ("Orin", "8.7"),
    "tegra194": ("Xavier", "7.2"),
    "tegra186": ("TX2", "6.2"),
    "tegra210": ("TX1/Nano", "5.3"),
}


def run_tool(args: list[str]) -> str | None:
    """stdout of a tool that exits 0 within TOOL_TIMEOUT_S, else None (absent or failing)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("tool_failed", tool=args[0], error=str(exc))
        return None
    if done.returncode != 0:
        log.info(
            "tool_failed",
            tool=args[0],
            returncode=done.returncode,
            stderr=done.stderr.strip()[:200],
        )
        return None
    return done.stdout


def read_captured(root: str, name: str) -> str | None:
    """A tool's captured output in a fake root (``<root>/.captured/<name>``)."""
    return read_text(root, f"/.captured/{name}")


# --- NVIDIA -------------------------------------------------------------------------


def read_nvml() -> list[GPUInfo] | None:
    """NVIDIA GPUs through NVML when nvidia-ml-py is importable; None when it is not usable.

    NVML answers from the driver directly (no process spawn) and is what nvidia-smi uses.
    It returns structured values, so there is no text to parse.
    """
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_* subclasses, driver missing
        log.info("nvml_unavailable", error=str(exc))
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GPUInfo(
                    vendor="nvidia",
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    vram_total_bytes=int(memory.total),
                    vram_free_bytes=int(memory.free),
                    driver=driver,
                    compute_capability=f"{major}.{minor}",
                    index=index,
                )
            )
        return gpus
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "ask nvidia-smi"
        log.info("nvml_failed", error=str(exc))
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a half-initialised NVML
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_nvidia_smi(root: str = "/") -> str | None:
    if not is_live(root):
        return read_captured(root, "nvidia-smi.csv")
    return run_tool(["nvidia-smi", *NVIDIA_SMI_ARGS])


def parse_nvidia_smi(text: str) -> list[GPUInfo]:
    """nvidia-smi CSV → GPUs. Without a header the columns are NVIDIA_SMI_FIELDS; with one
    (``--format=csv``) the header names them, in any order and with units such as
    "memory.total [MiB]" (values then carry " MiB" too). "[N/A]" fields are None."""
    rows = [
        r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if any(c.strip() for c in r)
    ]
    if not rows:
        return []
    fields: list[str] = list(NVIDIA_SMI_FIELDS)
    if "name" in [re.sub(r"\s*\[.*\]$", "", c.strip()) for c in rows[0]]:
        fields = [re.sub(r"\s*\[.*\]$", "", c.strip()) for c in rows[0]]
        rows = rows[1:]
    gpus = []
    for position, row in enumerate(rows):
        values = {f: _na(v) for f, v in zip(fields, row, strict=False)}
        name = values.get("name")
        if not name:
            continue
        index = values.get("index")
        gpus.append(
            GPUInfo(
                vendor="nvidia",
                name=name,
                vram_total_bytes=_mib(values.get("memory.total")),
                vram_free_bytes=_mib(values.get("memory.free")),
                driver=values.get("driver_version"),
                compute_capability=values.get("compute_cap"),
                index=int(index) if index and index.isdigit() else position,
            )
        )
    return gpus


def _na(value: str) -> str | None:
    value = value.strip()
    return None if not value or value.startswith("[N/A") or value == "N/A" else value


def _mib(value: str | None) -> int | None:
    if value is None:
        return None
    number = value.split()[0]
    return int(float(number) * MIB) if re.fullmatch(r"\d+(\.\d+)?", number) else None


# --- AMD ----------------------------------------------------------------------------


def read_amd_sysfs(root: str = "/") -> dict[str, dict[str, str]]:
    """Per DRM card: vendor, VRAM total/used and product name files (raw text)."""
    cards: dict[str, dict[str, str]] = {}
    base = under(root, "/sys/class/drm")
    try:
        names = sorted(p.name for p in base.iterdir() if re.fullmatch(r"card\d+", p.name))
    except OSError:
        return cards
    for name in names:
        files = {}
        for field in ("vendor", "mem_info_vram_total", "mem_info_vram_used", "product_name"):
            raw = read_first_line(root, f"/sys/class/drm/{name}/device/{field}")
            if raw is not None:
                files[field] = raw
        cards[name] = files
    return cards


def parse_amd_sysfs(cards: dict[str, dict[str, str]]) -> list[GPUInfo]:
    gpus = []
    for card, files in sorted(cards.items()):
        if files.get("vendor", "").lower() != "0x1002" or "mem_info_vram_total" not in files:
            continue
        total = (
            int(files["mem_info_vram_total"]) if files["mem_info_vram_total"].isdigit() else None
        )
        used = files.get("mem_info_vram_used", "")
        gpus.append(
            GPUInfo(
                vendor="amd",
                name=files.get("product_name") or f"AMD GPU ({card})",
                vram_total_bytes=total,
                vram_free_bytes=total - int(used) if total is not None and used.isdigit() else None,
                driver="amdgpu",
                index=int(card[4:]),
            )
        )
    return gpus


# --- Apple Silicon ------------------------------------------------------------------


def parse_apple_gpu(values: dict[str, str]) -> list[GPUInfo]:
    """Apple Silicon's GPU from sysctl values: unified memory, so VRAM = hw.memsize."""
    brand = values.get("machdep.cpu.brand_string", "")
    if not brand.startswith("Apple"):
        return []
    memsize = values.get("hw.memsize", "")
    return [
        GPUInfo(
            vendor="apple",
            name=f"{brand} GPU",
            vram_total_bytes=int(memsize) if memsize.isdigit() else None,
            unified_memory=True,
            driver="Metal",
        )
    ]


# --- Jetson -------------------------------------------------------------------------


def read_tegra_release(root: str = "/") -> str | None:
    return read_first_line(root, "/etc/nv_tegra_release")


def read_device_tree_compatible(root: str = "/") -> str | None:
    return read_text(root, "/proc/device-tree/compatible") or read_text(
        root, "/sys/firmware/devicetree/base/compatible"
    )


def parse_tegra_release(text: str) -> str | None:
    """ "# R35 (release), REVISION: 3.1, …" → "L4T R35.3.1"."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"L4T R{match.group(1)}.{match.group(2)}" if match else None


def parse_jetson_gpu(
    tegra_release: str | None,
    compatible: str | None,
    board: str | None,
    memory_total: int,
    memory_available: int,
) -> list[GPUInfo]:
    """A Jetson's integrated GPU; it shares RAM with the CPU, so VRAM = system RAM."""
    entries = [e for e in (compatible or "").split("\0") if e]
    socs = [e.split(",", 1)[1] for e in entries if e.startswith("nvidia,tegra")]
    if tegra_release is None and not socs:
        return []
    soc_name, capability = next((_TEGRA_SOCS[s] for s in socs if s in _TEGRA_SOCS), (None, None))
    name = board or (f"NVIDIA Jetson {soc_name}" if soc_name else "NVIDIA Jetson")
    return [
        GPUInfo(
            vendor="jetson",
            name=name,
            vram_total_bytes=memory_total or None,
            vram_free_bytes=memory_available or None,
            unified_memory=True,
            driver=parse_tegra_release(tegra_release) if tegra_release else None,
            compute_capability=capability,
        )
    ]


def probe_gpus(
    root: str,
    *,
    sysctl: dict[str, str],
    board: str | None,
    memory_total: int,
    memory_available: int,
) -> list[GPUInfo]:
    """Every GPU found, discrete first. A failing source is skipped, never fatal."""
    jetson = parse_jetson_gpu(
        read_tegra_release(root),
        read_device_tree_compatible(root),
        board,
        memory_total,
        memory_available,
    )
    nvidia: list[GPUInfo] = []
    # JetPack 6 ships an nvidia-smi that lists the integrated GPU with no memory figures;
    # the Jetson entry already describes that GPU.
    if not jetson:
        nvidia = (read_nvml() if is_live(root) else None) or parse_nvidia_smi(
            read_nvidia_smi(root) or ""
        )
    return nvidia + parse_amd_sysfs(read_amd_sysfs(root)) + parse_apple_gpu(sysctl) + jetson
