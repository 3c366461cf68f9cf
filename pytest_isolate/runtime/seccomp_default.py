"""The default seccomp profile: an allowlist as strict as Docker's default, stricter
in a few places, in Docker's JSON format (see ``seccomp.py``).

Everything not listed fails with EPERM. Compared with Docker's default it also
refuses io_uring (a long line of kernel escapes), AF_ALG sockets and every socket
family above them (AF_VSOCK, AF_XDP, ...), TIOCLINUX besides TIOCSTI, and 32-bit
socketcall(SYS_SOCKET), whose family argument no filter can see.
Capability-gated groups apply only when the test asked for the capability
(``cap_add``), as in Docker.
"""

from __future__ import annotations

import errno

# Grouped by purpose; names that do not exist on a machine are skipped.
ALLOWED = {
    "files": """access chdir chmod chown chown32 close close_range copy_file_range creat dup dup2
        dup3 faccessat faccessat2 fadvise64 fadvise64_64 fallocate fchdir fchmod fchmodat fchmodat2
        fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fremovexattr
        fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futimesat
        getcwd getdents getdents64 getxattr inotify_add_watch inotify_init inotify_init1
        inotify_rm_watch lchown lchown32 lgetxattr link linkat listxattr llistxattr _llseek
        lremovexattr lseek lsetxattr lstat lstat64 mkdir mkdirat mknod mknodat name_to_handle_at
        newfstatat open openat openat2 pread64 preadv preadv2 pwrite64 pwritev pwritev2 read
        readahead readlink readlinkat readv removexattr rename renameat renameat2 rmdir sendfile
        sendfile64 setxattr splice stat stat64 statfs statfs64 statx symlink symlinkat sync
        sync_file_range syncfs tee truncate truncate64 umask unlink unlinkat utime utimensat
        utimensat_time64 utimes vmsplice write writev fanotify_mark""",
    "memory": """brk madvise membarrier memfd_create memfd_secret mincore mlock mlock2 mlockall mmap
        mmap2 mprotect mremap msync munlock munlockall munmap pkey_alloc pkey_free pkey_mprotect
        remap_file_pages""",
    "processes": """arch_prctl capget capset execve execveat exit exit_group fork getcpu
        getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getpgid getpgrp
        getpid getppid getpriority getresgid getresgid32 getresuid getresuid32 getrlimit
        get_robust_list getrusage getsid get_thread_area gettid getuid getuid32 ioprio_get
        ioprio_set kill pidfd_open pidfd_send_signal prctl prlimit64 process_mrelease ptrace
        process_vm_readv process_vm_writev rseq sched_getaffinity sched_getattr sched_getparam
        sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
        sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
        sched_setscheduler sched_yield seccomp setfsgid setfsgid32 setfsuid setfsuid32 setgid
        setgid32 setgroups setgroups32 setpgid setpriority setregid setregid32 setresgid
        setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit set_robust_list setsid
        set_thread_area set_tid_address setuid setuid32 tgkill tkill ugetrlimit uname vfork
        wait4 waitid waitpid modify_ldt landlock_add_rule landlock_create_ruleset
        landlock_restrict_self""",
    "signals and time": """alarm clock_getres clock_getres_time64 clock_gettime clock_gettime64
        clock_nanosleep clock_nanosleep_time64 getitimer gettimeofday nanosleep pause
        restart_syscall rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn
        rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo setitimer
        sigaltstack signalfd signalfd4 sigprocmask sigreturn time timer_create timer_delete
        timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
        timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
        sysinfo getrandom""",
    "waiting and events": """epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait
        epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 futex futex_time64 futex_waitv
        poll ppoll ppoll_time64 pselect6 pselect6_time64 select _newselect pipe pipe2 io_cancel
        io_destroy io_getevents io_pgetevents io_pgetevents_time64 io_setup io_submit""",
    "sockets": """accept accept4 bind connect getpeername getsockname getsockopt listen recv
        recvfrom recvmmsg recvmmsg_time64 recvmsg send sendmmsg sendmsg sendto setsockopt
        shutdown socketpair""",
    "sysv ipc": """ipc msgctl msgget msgrcv msgsnd semctl semget semop semtimedop
        semtimedop_time64 shmat shmctl shmdt shmget mq_getsetattr mq_notify mq_open
        mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink""",
}

# Allowed only with the capability that makes them meaningful (Docker's grouping).
BY_CAPABILITY = {
    "CAP_SYS_ADMIN": """bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie
        mount mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd
        setdomainname sethostname setns syslog umount umount2 unshare""",
    "CAP_DAC_READ_SEARCH": "open_by_handle_at",
    "CAP_SYS_BOOT": "reboot",
    "CAP_SYS_CHROOT": "chroot",
    "CAP_SYS_MODULE": "delete_module init_module finit_module",
    "CAP_SYS_PACCT": "acct",
    "CAP_SYS_PTRACE": "kcmp pidfd_getfd process_madvise",
    "CAP_SYS_RAWIO": "iopl ioperm",
    "CAP_SYS_TIME": "settimeofday stime clock_settime clock_settime64 adjtimex clock_adjtime clock_adjtime64",
    "CAP_SYS_TTY_CONFIG": "vhangup",
    "CAP_SYS_NICE": "get_mempolicy mbind set_mempolicy set_mempolicy_home_node",
    "CAP_SYSLOG": "syslog",
    "CAP_BPF": "bpf",
    "CAP_PERFMON": "perf_event_open",
}

NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TERMINAL_INJECTION = (TIOCSTI, TIOCLINUX)
AF_ALG = 38
# personality(2) values that only select the Linux ABI or query it.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def _names(text: str) -> list[str]:
    return text.split()


def default_profile() -> dict:
    syscalls: list[dict] = [{"names": sorted(n for group in ALLOWED.values() for n in _names(group)),
                             "action": "SCMP_ACT_ALLOW"}]
    # Creating namespaces needs CAP_SYS_ADMIN: plain clone() only without those flags,
    # and clone3() (whose flags sit in memory, out of a filter's reach) fails with
    # ENOSYS so that libc falls back to clone().
    syscalls += [
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
         "args": [{"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS,
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        # Sockets of the families below AF_ALG (unix, inet, inet6, netlink, packet, ...).
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": AF_ALG, "op": "SCMP_CMP_LT"}]},
    ]
    syscalls += [{"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]} for value in PERSONALITIES]
    # ioctl; TIOCSTI and TIOCLINUX are refused by a second, hand-written filter
    # (seccomp.argument_filter), which libseccomp cannot express.
    syscalls += [{"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"}]
    syscalls += [{"names": _names(names), "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}}
                 for cap, names in BY_CAPABILITY.items()]
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.EPERM, "syscalls": syscalls}
