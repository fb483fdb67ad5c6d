"""Sampling: the samplers (`samplers`), the `trainer sample` job (`job`, `config`) and its output (`output`)."""
