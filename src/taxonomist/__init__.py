"""Taxonomist: declarative image-classification pipelines."""

import os

# pandas keeps text columns in Arrow. Arrow's own allocator (mimalloc, inside a 1 GiB reserved
# region) keeps the memory its kernels freed, so a stage's footprint would follow the largest
# table it ever hashed or filtered (measured in the preprocess stage: 8 MB retained at 100,000
# images, 2 MB at 10,000); with the system allocator ``malloc_trim`` hands it back. Arrow reads
# this variable once, when it loads: set here, before anything of the package imports pandas.
# A user's own setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

__version__ = "0.1.0"
