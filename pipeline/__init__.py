"""Pipeline stage: ImageNet (ImageFolder or WebDataset) -> VAE moments + encoder tokens in WebDataset shards, on Ray."""
