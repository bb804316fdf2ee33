"""seq2seq: recurrent sequence models (LSTM translation with attention, character LSTM LM)."""
import os

__version__ = "0.1.0"

# oneDNN keeps 1,024 compiled primitives by default, and a translator epoch's batch shapes need
# several thousand (each LSTM layer, product and reorder, per shape): at 1,024 it recompiles
# every step. Multi30k preset, full epochs on a 2-core Zen 5: 8,561-9,305 target tokens/s at the
# default, 10,224-10,724 at 16,384, resident memory the same (3.3-3.9 GB). Read when oneDNN
# first compiles, so it is set on import; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
