"""The container runtime: one module per kernel facility, standard library only.

Nothing here imports pytest or the plugin, so it runs unchanged in the launcher, in
the container host and in every forked container process.
"""
