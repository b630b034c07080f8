# A base config for tests/test_config.py: relative imports, LazyCall, plain values.
from collections import OrderedDict

from samantics_d2.d2 import LazyCall as L

model = L(OrderedDict)(depth=2, width=8)
train = dict(max_iter=10, output_dir="./output", nested=dict(lr=0.1))
