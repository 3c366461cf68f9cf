"""Docker's masked and read-only paths, applied over each test's fresh /proc and /sys
(``rootfs`` re-exports both functions)."""

from __future__ import annotations

import glob
import os

from . import mountinfo, syscalls
from .syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT

# Docker's masked and read-only paths: kernel state a container must not read (masked:
# /dev/null over files, an empty read-only tmpfs over directories) or write.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/firmware", "/sys/devices/virtual/powercap",
)
MASKED_GLOBS = ("/sys/devices/system/cpu/cpu*/thermal_throttle",)
READ_ONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def system_path_masks() -> list[tuple[str, str]]:
    """What mask_system_paths does, worked out once by the host (which sees the same
    kernel): ``(path, how)`` with how "dir" (empty tmpfs), "file" (/dev/null bound
    over it) or "ro" (bound read-only)."""
    masks = []
    for path in list(MASKED_PATHS) + [p for pattern in MASKED_GLOBS for p in glob.glob(pattern)]:
        if os.path.isdir(path):
            masks.append((path, "dir"))
        elif os.path.exists(path):
            masks.append((path, "file"))
    masks += [(path, "ro") for path in READ_ONLY_PATHS if os.path.exists(path)]
    return masks


def mask_system_paths(root: str, masks: list | None = None) -> None:
    """Apply the masked and read-only paths under ``root`` (after /proc and /sys)."""
    empty_dir = None  # one empty read-only tmpfs, bound over every masked directory
    for path, how in system_path_masks() if masks is None else masks:
        target = root.rstrip("/") + path
        try:
            if how == "dir" and empty_dir is None:
                syscalls.mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               "size=0,mode=0")
                empty_dir = target
            elif how == "dir":
                syscalls.mount(empty_dir, target, None, MS_BIND)
            elif how == "file":
                syscalls.mount(root.rstrip("/") + "/dev/null", target, None, MS_BIND)
            else:  # a fresh /proc has nothing mounted below these: no MS_REC, no scan
                syscalls.mount(target, target, None, MS_BIND)
                flags = MS_BIND | MS_REMOUNT | MS_RDONLY | mountinfo.locked_flags(target)
                syscalls.mount(None, target, None, flags)
        except FileNotFoundError:  # e.g. no /sys in this image
            continue
