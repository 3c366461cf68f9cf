"""The container runtime, standard library only: nothing here imports pytest or the
plugin, so it runs unchanged in the launcher, the container host and every forked
container process.

One module per process of the tree (as youki's ``process/``)::

    pytest (controller)                    controller.py (the plugin's side)
      └─ launcher         launch.py        builds the host's namespaces and stage,
           │                               forks, waits; dies with pytest
           └─ container host               ../remote.py (pytest glue) with
                │                          pipeline.py and supervisor.py: pid 1 of
                │                          its own pid namespace, collects the tests
                │                          once, runs each in a container
                ├─ factory    factory.py   small (forked before the host exec'd):
                │    │                     per test, new mount, net, uts, ipc
                │    │                     namespaces and the test's root, in itself
                │    └─ init  tiny_init.py pid 1 of a new pid namespace; sleeps
                └─ zygote     zygote.py    forked after collection; forks the tests
                     └─ test  test_process.py   born INTO init's pid namespace,
                                           joins the others, pivots, drops every
                                           privilege, runs the payload
                                           (../reporter.py, ../fresh.py)

Every boundary between them speaks the typed messages of ``link.py``. The kernel
facilities have a module each: namespaces (which, made by whom, in which order),
user_ns, rootfs, mountinfo, paths, network, cgroups, capabilities, seccomp,
landlock, hugepages; every system call goes through ``syscalls``.

Why two branches: a fork costs what the forking process holds (page tables, and
every page written afterwards is copied). Only the test needs the host's memory (the
collected items), so only the test is forked from (a zygote of) the host; everything
else is built by the small factory, usually while the previous test still runs.

Killing init ends the container: the kernel kills every process of its pid
namespace, and with the last one every mount and namespace goes. Each process of
the tree asks for SIGKILL when its parent dies, and every pid namespace of the
containers lies below the host's, so a SIGKILLed pytest takes it all down too.
"""
