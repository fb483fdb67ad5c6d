"""Training data: the shard offset index and order (`index`), local indexed reads (`indexed`), ranged reads from an
object store (`ranged`) and plain sequential streaming (`stream`)."""
