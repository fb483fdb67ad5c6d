"""Model families under the papers' names; `SiT_models` is the public registry of DESIGN §8."""
from trainer.models.sit import SiT, SiT_models

__all__ = ["SiT", "SiT_models"]
