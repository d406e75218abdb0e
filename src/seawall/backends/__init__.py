"""State stores for the primitives: in-memory (default) and Redis."""

__all__: list[str] = []
