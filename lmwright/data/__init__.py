"""The data layer: sources, formats, cleaning, the prepare pipeline (and tokenizers, chat templates).

``import lmwright.data`` stays light: no torch or transformers here; pyarrow and datasets are
imported by the readers that need them.
"""

from lmwright.data.config import CleanConfig, DataConfig
from lmwright.data.errors import DataError
from lmwright.data.formats import FORMATS
from lmwright.data.prepare import DataPrepareConfig, load_records, prepare
from lmwright.data.sources import Record, read_records

__all__ = ["FORMATS", "CleanConfig", "DataConfig", "DataError", "DataPrepareConfig", "Record", "load_records",
           "prepare", "read_records"]
