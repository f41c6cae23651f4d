"""Model-parallel class-center machinery: process groups, autograd collectives, the row-sharded
class-center bank, margins, the distributed margin softmax and the heads that plug into it.

Nothing here knows about images or files, and nothing distributed happens at import time.
"""
