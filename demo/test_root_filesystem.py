"""Copy-on-write root: a test may write anywhere in /, and nothing persists.

The two tests run in file order: the first writes /scratch.txt, the second
(in a new container) checks that the file is gone. Nothing reaches the host.
"""

import os

SCRATCH = "/scratch.txt"


def test_1_write_to_root():
    with open(SCRATCH, "w") as f:
        f.write("written inside a container\n")
    with open(SCRATCH) as f:
        assert f.read() == "written inside a container\n"


def test_2_write_did_not_persist():
    assert not os.path.exists(SCRATCH)
