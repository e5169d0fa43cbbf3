"""Moved to :mod:`lmwright.engine.sampling` (serve and export both sample, so it lives below them); this
name stays importable, as the same module object, for scripts written against it."""

import sys

from lmwright.engine import sampling

sys.modules[__name__] = sampling
