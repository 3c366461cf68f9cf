"""The containers' init: a static program of 185 bytes that sleeps until it is killed.

Pid 1 of a container only has to exist: the host kills it when the test is over, and
the kernel then kills everything else in its pid namespace. It gets no signal it has
no handler for (the kernel's rule for pid 1), and it ignores SIGCHLD (inherited from
the factory), so the kernel reaps the orphans it inherits. A forked Python process
does the same at ≈ 2 ms of CPU per container (the fork, its copy-on-write faults
and its exit); spawning this costs ≈ 0.1 ms, and as a process of its own it shares
no memory with the factory.

The program is one loop: ``pause(); goto loop``. stage.build_stage writes it into
the image stage at PATH, whose last component is what ps shows. Only x86_64 has
machine code here; elsewhere ``program`` returns None and the factory forks a
Python sleeper instead (factory._spawn_init).
"""

from __future__ import annotations

import os
import struct

PATH = "/.pytest-isolate-bin/isolate-init"

_LOAD_ADDRESS = 0x400000
_MACHINES = {
    # e_machine, code:  0: mov eax, 34 (pause)   5: syscall   7: jmp 0
    "x86_64": (0x3E, bytes.fromhex("b822000000" "0f05" "ebf7")),
}


def program(machine: str | None = None) -> bytes | None:
    """The ELF executable for ``machine`` (default: this one), or None."""
    known = _MACHINES.get(machine or os.uname().machine)
    if known is None:
        return None
    e_machine, code = known
    header_size, program_header_size, program_headers = 64, 56, 2
    code_offset = header_size + program_headers * program_header_size
    size = code_offset + len(code)
    elf_header = struct.pack(
        "<4sBBBB8xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0,  # 64-bit, little-endian, version 1, System V ABI
        2, e_machine, 1,  # an executable, for e_machine, version 1
        _LOAD_ADDRESS + code_offset,  # entry: the code, after the headers
        header_size, 0, 0,  # program headers right after; no sections; no flags
        header_size, program_header_size, program_headers, 0, 0, 0,
    )
    load_segment = struct.pack(
        "<IIQQQQQQ",
        1, 5,  # PT_LOAD, readable and executable
        0, _LOAD_ADDRESS, _LOAD_ADDRESS,  # the whole file, at the load address
        size, size, 0x1000,
    )
    stack = struct.pack("<IIQQQQQQ", 0x6474E551, 6, 0, 0, 0, 0, 0, 16)  # PT_GNU_STACK: not executable
    return elf_header + load_segment + stack + code
