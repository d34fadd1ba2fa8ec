"""axpo: fast, correct RL for multimodal tool-using agents.

`axpo.ops` holds the drop-in hot-path ops (any trainer can import it alone).
"""
__version__ = "0.1.0"
