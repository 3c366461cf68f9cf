"""OCI images: references, the content-addressed store, safe unpacking of layers and
the transports that fill the store (``oci:``, ``docker-archive:``, ``docker://`` registries).

Controller-side and standard library only: nothing here runs in a container, and a
container never reads the store but through the read-only layers it is given.
"""
